"""NudgingConfig and SamplingConfig: defaults, immutability, validation messages."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from langchain_nudging.config import NudgingConfig, SamplingConfig


def test_nudging_config_defaults() -> None:
    config = NudgingConfig()
    assert config.gamma == 0.4
    assert config.draft_tokens == 16
    assert config.chunk_tokens == 16
    assert config.max_tokens == 512
    assert config.max_rounds == 150
    assert config.max_same_nudges == 3
    assert config.loop_passage_words == 5
    assert config.min_repeat_chars == 30
    assert config.stop == ()
    assert config.base_sampling == SamplingConfig()
    assert config.nudging_sampling == SamplingConfig()


def test_sampling_config_defaults_are_greedy() -> None:
    sampling = SamplingConfig()
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (
        0.0,
        1.0,
        0,
        None,
    )
    assert sampling.greedy
    assert not SamplingConfig(temperature=0.7).greedy


@pytest.mark.parametrize(
    ("model", "field", "value"),
    [
        (NudgingConfig(), "gamma", 0.5),
        (NudgingConfig(), "stop", ("x",)),
        (SamplingConfig(), "temperature", 1.0),
    ],
)
def test_configs_are_frozen(model: Any, field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match="frozen"):
        setattr(model, field, value)


def test_nested_sampling_config_is_frozen() -> None:
    config = NudgingConfig(base_sampling={"temperature": 0.5})
    with pytest.raises(ValidationError, match="frozen"):
        config.base_sampling.temperature = 1.0  # type: ignore[misc]


def test_configs_are_hashable_and_equal_by_value() -> None:
    a = NudgingConfig(gamma=0.3, stop=["\nUser:"], base_sampling={"temperature": 0.5, "seed": 1})
    b = NudgingConfig(
        gamma=0.3, stop=("\nUser:",), base_sampling=SamplingConfig(temperature=0.5, seed=1)
    )
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b, NudgingConfig()}) == 2
    assert {a: "cached"}[b] == "cached"
    assert hash(SamplingConfig(top_p=0.9)) == hash(SamplingConfig(top_p=0.9))
    assert NudgingConfig(gamma=0.3) != NudgingConfig(gamma=0.31)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("STOP", ("STOP",)),
        (["a", "b"], ("a", "b")),
        (["a", "b", "a"], ("a", "b")),
        (("b", "a", "b"), ("b", "a")),
    ],
)
def test_stop_strings_become_a_tuple_without_duplicates(value: Any, expected: tuple) -> None:
    assert NudgingConfig(stop=value).stop == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gamma", 0.0),
        ("gamma", 1.0),
        ("draft_tokens", 1),
        ("chunk_tokens", 1),
        ("max_tokens", 1),
        ("max_rounds", 1),
        ("min_repeat_chars", 1),
    ],
)
def test_boundary_values_are_accepted(field: str, value: Any) -> None:
    assert getattr(NudgingConfig(**{field: value}), field) == value


@pytest.mark.parametrize(
    ("kwargs", "field", "bound"),
    [
        ({"gamma": -0.1}, "gamma", "greater than or equal to 0"),
        ({"gamma": 1.5}, "gamma", "less than or equal to 1"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"draft_tokens": 0}, "draft_tokens", "greater than or equal to 1"),
        ({"draft_tokens": 4097}, "draft_tokens", "less than or equal to 4096"),
        ({"chunk_tokens": 0}, "chunk_tokens", "greater than or equal to 1"),
        ({"max_rounds": 0}, "max_rounds", "greater than or equal to 1"),
        ({"max_same_nudges": 0}, "max_same_nudges", "greater than or equal to 1"),
        ({"loop_passage_words": 0}, "loop_passage_words", "greater than or equal to 1"),
        ({"min_repeat_chars": 0}, "min_repeat_chars", "greater than or equal to 1"),
        ({"stop": [""]}, "stop", "non-empty"),
        ({"stop": ["ok", ""]}, "stop", "non-empty"),
        ({"stop": ""}, "stop", "non-empty"),
        ({"gamma": "high"}, "gamma", "valid number"),
        (
            {"base_sampling": {"temperature": -1}},
            "base_sampling.temperature",
            "greater than or equal to 0",
        ),
        ({"nudging_sampling": {"top_p": 0}}, "nudging_sampling.top_p", "greater than 0"),
    ],
)
def test_bad_nudging_config_names_the_field_and_the_bound(
    kwargs: dict[str, Any], field: str, bound: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        NudgingConfig(**kwargs)
    message = str(caught.value)
    assert field in message
    assert bound in message
    assert [".".join(map(str, e["loc"])) for e in caught.value.errors()] == [field]


@pytest.mark.parametrize(
    ("kwargs", "field", "bound"),
    [
        ({"temperature": -0.1}, "temperature", "greater than or equal to 0"),
        ({"temperature": 100.5}, "temperature", "less than or equal to 100"),
        ({"top_p": 0.0}, "top_p", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
    ],
)
def test_bad_sampling_config_names_the_field_and_the_bound(
    kwargs: dict[str, Any], field: str, bound: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        SamplingConfig(**kwargs)
    message = str(caught.value)
    assert field in message
    assert bound in message


@pytest.mark.parametrize("model", [NudgingConfig, SamplingConfig])
def test_unknown_field_is_rejected_by_name(model: Any) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted") as caught:
        model(gama=0.5)
    assert "gama" in str(caught.value)


def test_field_descriptions_state_the_allowed_range() -> None:
    fields = NudgingConfig.model_fields
    assert "[0, 1]" in (fields["gamma"].description or "")
    assert "[1, 4096]" in (fields["draft_tokens"].description or "")
    assert "[1, 4096]" in (fields["chunk_tokens"].description or "")
    assert "(0, 1]" in (SamplingConfig.model_fields["top_p"].description or "")


def test_a_seed_beyond_64_bits_is_refused_at_construction() -> None:
    assert SamplingConfig(seed=2**64 - 1).seed == 2**64 - 1
    with pytest.raises(ValidationError, match="seed"):
        SamplingConfig(seed=2**64)  # torch's generators take 64-bit seeds
