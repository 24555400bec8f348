"""A model on an SGLang server (its native ``/generate``), as a text model.

The dialect of backends/served.py for SGLang, written from SGLang's documented request and
response shapes (0.5.x). SGLang does not run on this project's test machines: the tests drive
it against a stand-in that answers in those shapes (tests/fake_servers.py), not against a
real server; docs/servers.md says so.

* ``/generate`` with ``input_ids``, ``return_logprob``, ``top_logprobs_num: 2``, greedy
  ``temperature: 0`` and the server's other sampling defaults overridden; ``sampling_seed``
  for seeded sampling (used by servers started with ``--enable-deterministic-inference``).
* The boundaries of a draft are one request: the longest prompt with ``logprob_start_len``
  just before the shortest boundary, so the radix cache is reused up to there and the top
  log-probabilities of every later prompt position come back (``input_top_logprobs``).
* A window is one streamed ``/generate`` the session closes at the first token ending it;
  events may carry everything so far (SGLang's default) or only the new tokens
  (``--incremental-streaming-output``): ``output_token_logprobs_length`` tells which.
  Closing a window early also sends ``/abort_request`` for its ``rid``.
* A constrained choice restricted to some tokens uses ``logit_bias``; SGLang applies the bias
  before it computes log-probabilities, so the raw top-1 comes from an unrestricted call.
* Log-probabilities of sampled requests are temperature-scaled unless the server runs with
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``: checked at connect; without it only greedy requests
  are served.

A server URL without a prefix is recognized by ``/model_info`` (``/get_model_info`` on older
versions). Parameter in the spec: ``tokenizer``.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..config import SamplingConfig
from .base import ContextWindowError
from .cached import Choice
from .http import ServerClient, ServerError, check_params, register_dialect
from .served import TokenServerModel, seeded

PARAMS = frozenset({"tokenizer"})
#: Added to the logits of the allowed tokens of a restricted choice.
RESTRICT_BIAS = 100.0
_RAW_TOLERANCE = 1e-3


def _info(client: ServerClient, *paths: str) -> dict[str, Any] | None:
    for path in paths:
        try:
            found = client.get(path, retry=False)
        except (ServerError, ContextWindowError):
            continue
        if isinstance(found, dict):
            return found
    return None


def _recognizes(client: ServerClient) -> bool:
    info = _info(client, "/model_info", "/get_model_info")
    return info is not None and "model_path" in info


class SGLangModel(TokenServerModel):
    """One model served by SGLang."""

    raw_when_restricted = False  # logit_bias comes before the log-probabilities

    def __init__(self, client: ServerClient, params: Mapping[str, str]) -> None:
        check_params(client.url, params, PARAMS)
        info = _info(client, "/model_info", "/get_model_info")
        if info is None or "model_path" not in info:
            raise ServerError(f"{client.url} is not an SGLang server: no /model_info")
        server = _info(client, "/server_info", "/get_server_info") or {}
        path = str(info["model_path"])
        window = server.get("context_length") or server.get("max_req_input_len")
        super().__init__(
            client,
            params.get("tokenizer") or str(info.get("tokenizer_path") or path),
            name=str(info.get("served_model_name") or path).rsplit("/", 1)[-1],
            context_window=int(window) if window else None,
        )
        try:
            tokens = client.post(
                "/tokenize", {"prompt": self.sample_text, "add_special_tokens": False}
            )["tokens"]
        except ServerError as exc:
            if "404" not in str(exc):
                raise
            tokens = None  # before SGLang 0.5.4: the tokenizer is taken as the server's
        if tokens is not None:
            self.check_tokenizer([int(t) for t in tokens])
        self._check_logprobs()

    def _check_logprobs(self) -> None:
        probe = self.text.encode("The")
        cold = self._generate(self.body(probe, SamplingConfig(), 1))
        meta = cold.get("meta_info") or {}
        if not meta.get("output_top_logprobs"):
            raise ServerError(f"{self.url} returns no top log-probabilities (return_logprob)")
        hot = self._generate(self.body(probe, SamplingConfig(temperature=1.5, seed=7), 1))
        tops = [_top(m["meta_info"]["output_top_logprobs"][0])[0] for m in (cold, hot)]
        self.raw_when_sampling = abs(tops[0] - tops[1]) <= _RAW_TOLERANCE

    def body(
        self,
        ids: list[int],
        sampling: SamplingConfig,
        max_new_tokens: int,
        *,
        start: int = -1,
        allowed: list[int] | None = None,
        stream: bool = False,
        rid: str | None = None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,
            "min_p": sampling.min_p,
            # Frequency and presence count only this completion's tokens: refused at session.
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "repetition_penalty": sampling.repetition_penalty,
            "skip_special_tokens": False,
            "no_stop_trim": True,
        }
        seed = seeded(sampling, ids)
        if seed is not None:
            params["sampling_seed"] = seed
        if allowed is not None:
            params["logit_bias"] = {str(t): RESTRICT_BIAS for t in allowed}
        body: dict[str, Any] = {
            "input_ids": list(ids),
            "sampling_params": params,
            "return_logprob": True,
            "top_logprobs_num": 2,
            "logprob_start_len": start,
            "stream": stream,
        }
        if rid is not None:
            body["rid"] = rid
        return body

    def _generate(self, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.client.post("/generate", body)
        if isinstance(answer, list):
            answer = answer[0] if len(answer) == 1 else None
        if not isinstance(answer, dict) or "meta_info" not in answer:
            raise ServerError(f"{self.url}/generate: an answer without meta_info")
        _check_finish(self.url, answer["meta_info"])
        return answer

    def choose(
        self,
        prompts: Sequence[list[int]],
        sampling: SamplingConfig,
        allowed: list[int] | None = None,
        fresh: bool = False,
    ) -> tuple[list[Choice], int]:
        longest = list(prompts[-1])
        if not all(longest[: len(p)] == list(p) for p in prompts):
            found = [self.choose([p], sampling, allowed, fresh) for p in prompts]
            return [c for cs, _ in found for c in cs], sum(r for _, r in found)
        shortest = min(len(p) for p in prompts)
        start = shortest - 1 if len(prompts) > 1 else -1
        answer = self._generate(self.body(longest, sampling, 1, start=start, allowed=allowed))
        meta = answer["meta_info"]
        choices = []
        for prompt in prompts:
            if len(prompt) == len(longest):
                top = _top(meta["output_top_logprobs"][0])
                choices.append((int(answer["output_ids"][0]), top[0], top[1]))
            else:
                row = (meta.get("input_top_logprobs") or [])[len(prompt) - start]
                top = _top(row)
                choices.append((_best_id(row), top[0], top[1]))
        return choices, _computed(meta)

    def stream(
        self,
        ids: list[int],
        size: int,
        sampling: SamplingConfig,
        read: list[int],
        fresh: bool = False,
    ) -> Iterator[Choice]:
        rid = uuid.uuid4().hex
        body = self.body(ids, sampling, size, stream=True, rid=rid)
        seen, finished = 0, False
        try:
            with self.client.stream("/generate", body) as events:
                for event in events:
                    meta = event.get("meta_info") or {}
                    _check_finish(self.url, meta)
                    finished = meta.get("finish_reason") is not None
                    made = meta.get("output_token_logprobs") or []
                    tops = meta.get("output_top_logprobs") or []
                    total = int(meta.get("output_token_logprobs_length") or len(made))
                    new = total - seen
                    if new <= 0:
                        continue
                    if finished:
                        read[0] += _computed(meta) - 1  # the generated ones come below
                    for entry, top in zip(made[-new:], tops[-new:], strict=True):
                        seen += 1
                        read[0] += 1
                        best = _top(top)
                        yield int(entry[1]), best[0], best[1]
        finally:
            if not finished:
                self._abort(rid)

    def _abort(self, rid: str) -> None:
        """Tell the server to stop a request this session no longer reads (best effort)."""
        with contextlib.suppress(ServerError, ContextWindowError):
            self.client.post("/abort_request", {"rid": rid}, retry=False)


def _check_finish(url: str, meta: Mapping[str, Any]) -> None:
    reason = meta.get("finish_reason")
    if isinstance(reason, dict) and reason.get("type") == "abort":
        raise ServerError(f"{url}: the server aborted the request: {reason.get('message')}")


def _top(row: Sequence[Sequence[Any]] | None) -> tuple[float, float]:
    """Top-1 and top-2 probabilities of one ``[[logprob, id, text], ...]`` row."""
    values = sorted((float(e[0]) for e in row or () if e and e[0] is not None), reverse=True)
    if not values:
        raise ServerError("SGLang: a position without top log-probabilities")
    return math.exp(values[0]), math.exp(values[1]) if len(values) > 1 else 0.0


def _best_id(row: Sequence[Sequence[Any]]) -> int:
    return int(max(row, key=lambda e: float(e[0]))[1])


def _computed(meta: Mapping[str, Any]) -> int:
    return int(meta.get("prompt_tokens") or 0) - int(meta.get("cached_tokens") or 0)


def _build(
    client: ServerClient, params: Mapping[str, str], *, slot_wait: float | None = None
) -> SGLangModel:
    return SGLangModel(client, params)


register_dialect("sglang", _recognizes, _build)
