"""The HTTP family's client: server URLs, bounded retried calls, error messages, streams; and
the llama.cpp dialect's refusals and byte-level pieces, on recorded responses (httpx's mock
transport). The real servers are in integration_tests/test_llamacpp.py."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import llguidance
import pytest

from langchain_nudging.backends.base import ContextWindowError
from langchain_nudging.backends.http import (
    API_KEY_ENV,
    ServerClient,
    ServerError,
    ServerSpec,
    check_params,
    parse_server,
    resumed,
    server_model,
)
from langchain_nudging.backends.llamacpp import LlamaCppModel, _ByteMatcher, _Bytes, _Slots

URL = "http://127.0.0.1:8080"
Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, **options: object) -> ServerClient:
    return ServerClient(URL, transport=httpx.MockTransport(handler), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("http://127.0.0.1:8080", ServerSpec(None, "http://127.0.0.1:8080")),
        ("https://models.example:443/", ServerSpec(None, "https://models.example")),
        (
            "llamacpp+http://10.0.0.2:9000/x?y=1",
            ServerSpec("llamacpp", "http://10.0.0.2:9000", (("y", "1"),)),
        ),
        ("vllm+https://h:1", ServerSpec("vllm", "https://h:1")),
        ("bundled:gemma-3-270m", None),
        ("/models/a.gguf", None),
        ("ftp://h:1", None),
        ("http://", None),
        (42, None),
    ],
)
def test_server_specs(spec: object, parsed: ServerSpec | None) -> None:
    assert parse_server(spec) == parsed


def test_an_unknown_dialect_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown server dialect 'nope'.*llamacpp\+http"):
        server_model("nope+http://127.0.0.1:1")


def test_options_of_local_models_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="dtype"):
        server_model(URL, dtype="float16")


@pytest.mark.parametrize(("timeout", "retries"), [(0, None), (-1, None), (None, -1)])
def test_bad_timeouts_and_retries_are_refused(timeout: float | None, retries: int | None) -> None:
    with pytest.raises(ValueError, match=r"timeout|max_retries"):
        ServerClient(URL, timeout=timeout, max_retries=retries)


def failing(times: int, answer: Callable[[], httpx.Response]) -> tuple[Handler, list[int]]:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) <= times:
            raise httpx.ConnectError("connection refused", request=request)
        return answer()

    return handler, seen


def test_connection_failures_are_retried_with_backoff() -> None:
    handler, seen = failing(2, lambda: httpx.Response(200, json={"ok": 1}))
    assert client(handler, max_retries=2).get("/health") == {"ok": 1}
    assert len(seen) == 3


def test_retries_give_up_with_the_url_in_the_message() -> None:
    handler, seen = failing(10, lambda: httpx.Response(200))
    with pytest.raises(ServerError, match=r"cannot reach the server at http://127\.0\.0\.1:8080"):
        client(handler, max_retries=1).get("/health")
    assert len(seen) == 2


def test_5xx_is_retried_then_reported() -> None:
    answers = [httpx.Response(503, text="busy"), httpx.Response(200, json={"ok": 1})]
    assert client(lambda r: answers.pop(0)).post("/completion", {}) == {"ok": 1}
    with pytest.raises(ServerError, match="HTTP 500: boom"):
        client(
            lambda r: httpx.Response(500, json={"error": {"message": "boom"}}), max_retries=0
        ).post("/completion", {})


def test_a_4xx_is_not_retried() -> None:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return httpx.Response(400, json={"error": {"message": "bad field"}})

    with pytest.raises(ServerError, match="HTTP 400: bad field"):
        client(handler).post("/completion", {})
    assert len(seen) == 1


def test_a_context_overflow_is_a_context_window_error() -> None:
    error = {"error": {"type": "exceed_context_size_error", "message": "exceeds the context"}}
    with pytest.raises(ContextWindowError, match="exceeds the context"):
        client(lambda r: httpx.Response(400, json=error)).post("/completion", {})


def test_the_api_key_is_sent_from_the_option_or_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={})

    client(handler, api_key="k1").get("/health")
    monkeypatch.setenv(API_KEY_ENV, "k2")
    client(handler).get("/health")
    monkeypatch.delenv(API_KEY_ENV)
    client(handler).get("/health")
    assert keys == ["Bearer k1", "Bearer k2", None]


def test_a_refused_key_says_how_to_give_one() -> None:
    with pytest.raises(ServerError, match=f"api_key or \\${API_KEY_ENV}"):
        client(lambda r: httpx.Response(401, json={"error": "unauthorized"})).get("/props")


def sse(*events: object) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)


def test_streams_yield_events_and_report_an_error_event() -> None:
    body = sse({"n": 1}, {"n": 2}) + b"data: [DONE]\n\n"
    answer = client(lambda r: httpx.Response(200, content=body))
    with answer.stream("/completion", {}) as events:
        assert [e["n"] for e in events] == [1, 2]
    broken = client(lambda r: httpx.Response(200, content=sse({"n": 1}, {"error": "died"})))
    with pytest.raises(ServerError, match="died"), broken.stream("/completion", {}) as events:
        list(events)


# -- the llama.cpp dialect ------------------------------------------------------------------


def fake_llamacpp(completion: dict[str, object]) -> Handler:
    """A recorded llama.cpp server whose /completion answers ``completion``."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/props":
            return httpx.Response(
                200,
                json={
                    "default_generation_settings": {"n_ctx": 64},
                    "total_slots": 1,
                    "model_alias": "m.gguf",
                    "bos_token": "<s>",
                },
            )
        if request.url.path == "/tokenize":
            content = json.loads(request.content)["content"]
            return httpx.Response(200, json={"tokens": [1] * len(content)})
        return httpx.Response(200, json=completion)

    return handler


def test_a_server_without_probabilities_is_refused_at_connect() -> None:
    with pytest.raises(ServerError, match="n_probs"):
        LlamaCppModel(client(fake_llamacpp({"content": "x", "tokens": [5]})))
    without_ids = {
        "tokens": [5],
        "completion_probabilities": [{"logprob": -1.0, "top_logprobs": []}],
    }
    with pytest.raises(ServerError, match="token ids and bytes"):
        LlamaCppModel(client(fake_llamacpp(without_ids)))


def test_all_slots_held_waits_then_fails_clearly() -> None:
    entry = {
        "id": 5,
        "bytes": [97],
        "logprob": -0.1,
        "top_logprobs": [{"id": 5, "bytes": [97], "logprob": -0.1}],
    }
    model = LlamaCppModel(
        client(fake_llamacpp({"tokens": [5], "completion_probabilities": [entry]})),
        slot_wait=0.2,
    )
    assert model.open_slot() == 0
    with pytest.raises(ServerError, match=r"all 1 slots of http://127\.0\.0\.1:8080 are held"):
        model.open_slot()
    model.close_slot(0)
    assert model.open_slot() == 0


def test_slots_wait_is_bounded() -> None:
    slots = _Slots(1)
    assert slots.take(0.0) == 0
    assert slots.take(0.05) is None
    slots.give(0)
    assert slots.take(0.0) == 0


class Pieces:
    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces
        self.stop_ids = {i for i, p in pieces.items() if not p}


def test_bytes_of_a_split_character_come_with_the_token_completing_it() -> None:
    euro = "€".encode()
    model = Pieces({1: b"a", 2: euro[:1], 3: euro[1:2], 4: euro[2:], 5: b""})
    text = _Bytes(model)  # type: ignore[arg-type]
    out = []
    for token_id in (1, 2, 3, 4, 5):
        out.append((text.add(token_id), text.incomplete))
    assert out == [("a", False), ("", True), ("", True), ("€", False), ("", False)]


def test_the_byte_matcher_follows_the_answer_and_checks_candidates() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = _ByteMatcher(grammar)
    matcher.follow(matcher.answer_ids('{"a": '))
    assert matcher.allows(b"1", False)
    assert not matcher.allows(b'"x', False)
    assert not matcher.allows(b"", True)  # the object is not complete
    matcher.follow(matcher.answer_ids('{"a": 12}'))
    assert matcher.allows(b"", True)
    matcher.follow(matcher.answer_ids("{"))  # rolled back
    assert matcher.allows(b'"', False)


def test_an_unknown_runtime_is_refused_by_name() -> None:
    from langchain_nudging.backends.registry import text_model

    with pytest.raises(
        ValueError, match=r"runtime: expected one of \('transformers', 'llamacpp', 'vllm'\)"
    ):
        text_model("bundled:gemma-3-270m", runtime="sglang")


def test_the_vllm_runtime_serves_folders_and_bundled_ids_only(tmp_path: object) -> None:
    from langchain_nudging.backends.vllm_runtime import folder_of

    with pytest.raises(ValueError, match="serves a bundled id or a model folder"):
        folder_of("org/some-model-not-here")
    assert folder_of(tmp_path) == tmp_path


def test_the_llamacpp_runtime_serves_gguf_files_and_bundled_ids_only(tmp_path: object) -> None:
    from langchain_nudging.backends.llamacpp_runtime import gguf_of

    with pytest.raises(ValueError, match=r"serves a bundled id or a \.gguf file"):
        gguf_of("org/some-model")
    with pytest.raises(ValueError, match="no GGUF file at"):
        gguf_of("/nowhere/model.gguf")


def test_a_stream_lost_midway_is_asked_again_from_the_last_token() -> None:
    calls: list[tuple[list[int], int]] = []

    def stream(ids: list[int], size: int) -> Iterator[tuple[int, float, float]]:
        calls.append((list(ids), size))
        for n in range(size):
            if len(calls) == 1 and n == 2:
                raise ServerError("connection reset")
            yield (100 + len(ids) + n, 0.9, 0.1)

    got = [c[0] for c in resumed(stream, [1, 2], 5, retries=1)]
    assert got == [102, 103, 104, 105, 106]
    assert calls == [([1, 2], 5), ([1, 2, 102, 103], 3)]

    def broken(ids: list[int], size: int) -> Iterator[tuple[int, float, float]]:
        raise ServerError("down")
        yield (0, 0.0, 0.0)

    with pytest.raises(ServerError, match="down"):
        list(resumed(broken, [1], 3, retries=2))


def test_unknown_server_parameters_are_refused_by_name() -> None:
    check_params("http://h:1", {"tokenizer": "x"}, {"tokenizer", "model"})
    with pytest.raises(ValueError, match=r"\['tokenizr'\].*model, tokenizer"):
        check_params("http://h:1", {"tokenizr": "x"}, {"tokenizer", "model"})
    with pytest.raises(ValueError, match="unknown server parameters"):
        server_model("llamacpp+http://127.0.0.1:9?slot=1")


def test_the_chat_model_offers_every_runtime() -> None:
    from typing import get_args

    from langchain_nudging import NudgedChatModel
    from langchain_nudging.backends.registry import runtimes

    assert get_args(NudgedChatModel.model_fields["runtime"].annotation) == runtimes()


def test_a_server_that_exits_at_start_reports_its_log() -> None:
    import sys

    from langchain_nudging.backends.http import ChildServer, ServerStartError

    server = ChildServer("a test server")
    server.start([sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"])
    with pytest.raises(
        ServerStartError, match=r"a test server exited at start \(code 3\): no model here"
    ):
        server.wait_ready(30)
    server.stop()
    assert not server.running
