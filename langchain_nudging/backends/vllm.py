"""A model on a vLLM server (its OpenAI-compatible ``/v1/completions``), as a text model.

The dialect of backends/served.py for vLLM (docs/servers.md has the measurements behind it):

* Prompts are token ids; ``logprobs: 2`` with ``return_tokens_as_token_ids`` (so two tokens
  with one string never collapse) and ``return_token_ids``; ``temperature: 0`` for greedy
  choices, and every other sampling default of the server (``max_tokens`` 16, the model's
  generation config) overridden explicitly.
* The boundaries of a draft are verified in one call of several token-id prompts with
  ``max_tokens: 1``: each reads the prompt from vLLM's prefix cache (``prompt_logprobs``
  would answer them in one prefill, but such a request skips cache reads: measured slower
  past a short prompt, docs/servers.md).
* A window is one streamed completion that the session closes at the first token ending it,
  which stops the server generating.
* A constrained choice restricted to the grammar's tokens uses ``allowed_token_ids`` (vLLM
  computes raw log-probabilities before that mask). The ``structured_outputs`` field is not
  used: it constrains a completion from the grammar's start, not an answer two models write.
* At connect the server must return raw log-probabilities (``--logprobs-mode raw_logprobs``,
  the default: checked by comparing a probe at two temperatures) and at least 2 of them
  (``--max-logprobs``), and its tokenizer must be the one loaded here.

A server URL without a prefix is recognized by ``/v1/models`` (``owned_by: "vllm"``).
Parameters in the spec: ``model`` (the served model's name, when the server has several) and
``tokenizer``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..config import SamplingConfig
from .base import ContextWindowError
from .cached import Choice
from .http import ServerClient, ServerError, check_params, register_dialect
from .served import TokenServerModel, seeded

PARAMS = frozenset({"model", "tokenizer"})
_RAW_TOLERANCE = 1e-3  # log-probability: raw ones do not move with the temperature


def _models(client: ServerClient) -> list[dict[str, Any]]:
    listing = client.get("/v1/models", retry=False)
    data = listing.get("data") if isinstance(listing, dict) else None
    return [m for m in data or () if isinstance(m, dict)]


def _recognizes(client: ServerClient) -> bool:
    try:
        return any(m.get("owned_by") == "vllm" for m in _models(client))
    except (ServerError, ContextWindowError):
        return False


class VLLMModel(TokenServerModel):
    """One model served by vLLM."""

    def __init__(self, client: ServerClient, params: Mapping[str, str]) -> None:
        check_params(client.url, params, PARAMS)
        try:
            models = _models(client)
        except ServerError as exc:
            raise ServerError(f"{client.url} is not a vLLM server: {exc}") from None
        wanted = params.get("model")
        served = [m for m in models if wanted in (None, m.get("id"))]
        if not served:
            names = [m.get("id") for m in models]
            raise ServerError(f"{client.url} serves {names}, not {wanted!r} (?model=...)")
        info = served[0]
        self.served_name = str(info.get("id"))
        window = info.get("max_model_len")
        super().__init__(
            client,
            params.get("tokenizer") or str(info.get("root") or self.served_name),
            name=self.served_name.rsplit("/", 1)[-1],
            context_window=int(window) if window else None,
        )
        tokens = client.post(
            "/tokenize",
            {"model": self.served_name, "prompt": self.sample_text, "add_special_tokens": False},
        )["tokens"]
        self.check_tokenizer([int(t) for t in tokens])
        self._check_logprobs()

    def _check_logprobs(self) -> None:
        """Refuse a server whose log-probabilities nudging cannot read (see the module)."""
        probe = self.text.encode("The")
        greedy = SamplingConfig()
        try:
            cold = self._complete([probe], greedy, 1, seed=None)
        except ServerError as exc:
            if "logprobs" in str(exc):
                raise ServerError(
                    f"{self.url} refuses 2 log-probabilities per token ({exc}); start it with "
                    "--max-logprobs 20 (nudging needs at least 2)"
                ) from None
            raise
        hot = self._complete([probe], SamplingConfig(temperature=1.9, seed=7), 1, seed=7)
        entries = [c.get("logprobs") or {} for c in cold["choices"] + hot["choices"]]
        if not all(e.get("top_logprobs") for e in entries):
            raise ServerError(f"{self.url} returns no top log-probabilities (logprobs)")
        top = [max(e["top_logprobs"][0].values()) for e in entries]
        if abs(top[0] - top[1]) > _RAW_TOLERANCE:
            raise ServerError(
                f"{self.url} returns processed log-probabilities (they change with the "
                "temperature); gamma needs the raw ones: start vLLM with "
                "--logprobs-mode raw_logprobs"
            )

    def body(
        self,
        prompt: list[int] | list[list[int]],
        sampling: SamplingConfig,
        max_tokens: int,
        seed: int | None,
        *,
        allowed: list[int] | None = None,
        stream: bool = False,
        fresh: bool = False,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.served_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "logprobs": 2,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
            "stream": stream,
            # Only these shape the choice, as in this process (raw_logprobs are taken before
            # any of them). vLLM's frequency and presence penalties count only the tokens of
            # this completion, not the answer sent as its prompt: they are refused at session.
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,
            "min_p": sampling.min_p,
            "repetition_penalty": sampling.repetition_penalty,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "skip_special_tokens": False,
            "ignore_eos": False,
            "n": 1,
        }
        if seed is not None:
            body["seed"] = seed
        if allowed is not None:
            body["allowed_token_ids"] = allowed
        if stream:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": False}
        if fresh:  # a salt no other request has: nothing is read from the prefix cache
            body["cache_salt"] = secrets.token_hex(16)
        return body

    def _complete(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        max_tokens: int,
        *,
        seed: int | None,
        allowed: list[int] | None = None,
        fresh: bool = False,
    ) -> Any:
        prompt: Any = list(prompts[0]) if len(prompts) == 1 else [list(p) for p in prompts]
        body = self.body(prompt, sampling, max_tokens, seed, allowed=allowed, fresh=fresh)
        answer = self.client.post("/v1/completions", body)
        if len(answer.get("choices") or ()) != len(prompts):
            raise ServerError(f"{self.url}: {len(prompts)} prompts, but not as many choices")
        answer["choices"].sort(key=lambda c: c.get("index", 0))
        return answer

    def choose(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        allowed: list[int] | None = None,
        fresh: bool = False,
    ) -> tuple[list[Choice], int]:
        seed = seeded(sampling, prompts[-1])
        answer = self._complete(prompts, sampling, 1, seed=seed, allowed=allowed, fresh=fresh)
        choices = [_choices(self.url, c)[0] for c in answer["choices"]]
        return choices, _computed(answer.get("usage"))

    def stream(
        self,
        ids: list[int],
        size: int,
        sampling: SamplingConfig,
        read: list[int],
        fresh: bool = False,
    ) -> Iterator[Choice]:
        body = self.body(ids, sampling, size, seeded(sampling, ids), stream=True, fresh=fresh)
        with self.client.stream("/v1/completions", body) as events:
            for event in events:
                if event.get("usage"):
                    read[0] += _computed(event["usage"]) - 1  # the generated ones come below
                for choice in event.get("choices") or ():
                    for made in _choices(self.url, choice):
                        read[0] += 1
                        yield made


def _computed(usage: Mapping[str, Any] | None) -> int:
    """Prompt positions the server computed: its prompt tokens less those read from its
    prefix cache (``cached_tokens``, reported with ``--enable-prompt-tokens-details``)."""
    if not usage:
        return 0
    details = usage.get("prompt_tokens_details") or {}
    return int(usage.get("prompt_tokens") or 0) - int(details.get("cached_tokens") or 0)


def _choices(url: str, choice: Mapping[str, Any]) -> list[Choice]:
    """The tokens of one completion choice (or stream event) with raw top-1 and top-2."""
    logprobs = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    tops = logprobs.get("top_logprobs") or []
    if ids is None:
        ids = [_token_id(url, t) for t in logprobs.get("tokens") or ()]
    if len(tops) != len(ids):
        raise ServerError(f"{url}: a completion without one log-probability entry per token")
    made = []
    for token_id, top in zip(ids, tops, strict=True):
        best = sorted((float(v) for v in (top or {}).values()), reverse=True)
        if not best:
            raise ServerError(f"{url}: a token without top log-probabilities")
        made.append((int(token_id), math.exp(best[0]), math.exp(best[1]) if len(best) > 1 else 0.0))
    return made


def _token_id(url: str, token: str) -> int:
    name, _, number = str(token).partition(":")
    if name != "token_id" or not number.isdigit():
        raise ServerError(f"{url}: a token {token!r} not given as an id")
    return int(number)


def _build(
    client: ServerClient, params: Mapping[str, str], *, slot_wait: float | None = None
) -> VLLMModel:
    return VLLMModel(client, params)


register_dialect("vllm", _recognizes, _build)
