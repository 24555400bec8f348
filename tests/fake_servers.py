"""Stand-ins for serving engines that cannot run here, answering in their documented shapes.

:class:`FakeSGLang` answers SGLang's native API (``/model_info``, ``/server_info``,
``/tokenize``, ``/generate`` plain and streamed, ``/abort_request``) in the shapes of SGLang
0.5.x (its ``io_struct.py`` and ``tokenizer_manager.py``), computed by a real tiny
transformers model: every log-probability is that model's, so an answer through the dialect
can be compared with the same model run in this process. :class:`FakeVLLM` does the same for
the parts of vLLM's ``/v1/completions`` that a real vLLM cannot be made to show cheaply
(processed log-probabilities, a low ``--max-logprobs``). Each is an ``httpx.MockTransport``
handler; :attr:`requests` records the bodies received.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

from langchain_nudging.models import LoadedModel


class TinyEngine:
    """Next-token log-probabilities of a tiny model, computed afresh for every request."""

    def __init__(self, loaded: LoadedModel, folder: Path) -> None:
        self.loaded = loaded
        self.folder = folder
        loaded.tokenizer.save_pretrained(folder)
        self.requests: list[tuple[str, Any]] = []

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-softmax over the vocabulary after each prefix of ``ids`` (rows 0..len-1)."""
        with torch.no_grad():
            logits = self.loaded.model(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    def pick(
        self, row: torch.Tensor, params: dict[str, Any], generator: torch.Generator
    ) -> tuple[int, torch.Tensor]:
        """The chosen id after one row of raw log-probabilities, and the row as reported
        (temperature-scaled for sampled requests, as a server without raw mode reports)."""
        scores = row.clone()
        for token, bias in (params.get("logit_bias") or {}).items():
            scores[int(token)] += float(bias)
        temperature = float(params.get("temperature", 1.0))
        if temperature < 1e-6:
            return int(torch.argmax(scores)), torch.log_softmax(scores, dim=-1)
        scaled = torch.log_softmax(scores / temperature, dim=-1)
        return int(torch.multinomial(scaled.exp(), 1, generator=generator)), scaled

    def is_stop(self, token_id: int) -> bool:
        return token_id == self.loaded.tokenizer.eos_token_id


def _entries(row: torch.Tensor, k: int) -> list[list[Any]]:
    values, ids = torch.topk(row, k)
    return [[float(v), int(i), None] for v, i in zip(values, ids, strict=True)]


class FakeSGLang(TinyEngine):
    """SGLang's native API over a tiny model (see the module's docstring)."""

    def __init__(
        self,
        loaded: LoadedModel,
        folder: Path,
        *,
        incremental: bool = False,
        raw_when_sampling: bool = True,
    ) -> None:
        super().__init__(loaded, folder)
        self.incremental = incremental
        self.raw_when_sampling = raw_when_sampling
        self.aborted: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.requests.append((path, body))
        if path == "/model_info":
            return httpx.Response(
                200,
                json={
                    "model_path": str(self.folder),
                    "tokenizer_path": str(self.folder),
                    "served_model_name": self.loaded.name,
                    "is_generation": True,
                },
            )
        if path == "/server_info":
            return httpx.Response(
                200,
                json={
                    "context_length": self.loaded.context_window,
                    "incremental_streaming_output": self.incremental,
                    "version": "0.5.23",
                },
            )
        if path == "/health":
            return httpx.Response(200)
        if path == "/tokenize":
            tokenizer = self.loaded.tokenizer
            special = bool(body.get("add_special_tokens", True))
            ids = tokenizer(body["prompt"], add_special_tokens=special)["input_ids"]
            return httpx.Response(200, json={"tokens": ids, "count": len(ids)})
        if path == "/abort_request":
            self.aborted.append(body.get("rid", ""))
            return httpx.Response(200)
        if path == "/generate":
            return self._generate(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def _generate(self, body: dict[str, Any]) -> httpx.Response:
        ids = list(body["input_ids"])
        if len(ids) >= (self.loaded.context_window or 1 << 30):
            message = (
                f"The input ({len(ids)} tokens) is longer than the model's context length "
                f"({self.loaded.context_window} tokens)."
            )
            return httpx.Response(400, json={"error": {"message": message}})
        params = body["sampling_params"]
        k = int(body.get("top_logprobs_num") or 0)
        start = int(body.get("logprob_start_len", -1))
        generator = torch.Generator().manual_seed(int(params.get("sampling_seed") or 0))
        rows = self.logprobs(ids)
        meta: dict[str, Any] = {
            "id": body.get("rid") or "r",
            "prompt_tokens": len(ids),
            "cached_tokens": 0,
            "input_token_logprobs": [],
            "input_top_logprobs": [],
        }
        if start >= 0:
            # One entry per token of input_ids[start:], the first without a log-probability.
            meta["input_top_logprobs"] = [None] + [
                _entries(rows[i - 1], k) for i in range(start + 1, len(ids))
            ]
        events = self._decode(ids, rows[-1], params, k, generator)
        if body.get("stream"):
            return self._streamed(events, meta, body)
        made, tops, out, reason = [], [], [], None
        for entry, top, last in events:
            made.append(entry)
            tops.append(top)
            out.append(entry[1])
            reason = last
        meta |= {
            "completion_tokens": len(out),
            "finish_reason": reason,
            "output_token_logprobs": made,
            "output_top_logprobs": tops,
            "output_token_logprobs_length": len(made),
        }
        return httpx.Response(200, json={"text": "", "output_ids": out, "meta_info": meta})

    def _decode(
        self,
        ids: list[int],
        row: torch.Tensor,
        params: dict[str, Any],
        k: int,
        generator: torch.Generator,
    ) -> Iterator[tuple[list[Any], list[list[Any]], dict[str, Any] | None]]:
        ids = list(ids)
        limit = int(params.get("max_new_tokens", 128))
        for n in range(limit):
            token_id, reported = self.pick(row, params, generator)
            if self.raw_when_sampling and not params.get("logit_bias"):
                reported = row
            entry = [float(reported[token_id]), token_id, None]
            stop = self.is_stop(token_id)
            reason = None
            if stop:
                reason = {"type": "stop", "matched": token_id}
            elif n == limit - 1:
                reason = {"type": "length", "length": limit}
            yield entry, _entries(reported, k), reason
            if reason is not None:
                return
            ids.append(token_id)
            row = self.logprobs(ids)[-1]

    def _streamed(
        self,
        events: Iterator[tuple[list[Any], list[list[Any]], dict[str, Any] | None]],
        meta: dict[str, Any],
        body: dict[str, Any],
    ) -> httpx.Response:
        def lines() -> Iterator[bytes]:
            made: list[Any] = []
            tops: list[Any] = []
            for entry, top, reason in events:
                made.append(entry)
                tops.append(top)
                shown = slice(-1, None) if self.incremental else slice(None)
                event = {
                    "text": "",
                    "output_ids": [e[1] for e in made][shown],
                    "meta_info": meta
                    | {
                        "finish_reason": reason,
                        "completion_tokens": len(made),
                        "output_token_logprobs": made[shown],
                        "output_top_logprobs": tops[shown],
                        "output_token_logprobs_length": len(made),
                    },
                }
                yield f"data: {json.dumps(event)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_Lines(lines())
        )


class FakeVLLM(TinyEngine):
    """The parts of vLLM's API that connect checks read (see the module's docstring)."""

    def __init__(
        self, loaded: LoadedModel, folder: Path, *, max_logprobs: int = 20, raw: bool = True
    ) -> None:
        super().__init__(loaded, folder)
        self.max_logprobs = max_logprobs
        self.raw = raw

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else None
        self.requests.append((path, body))
        if path == "/v1/models":
            model = {
                "id": self.loaded.name,
                "owned_by": "vllm",
                "root": str(self.folder),
                "max_model_len": self.loaded.context_window,
            }
            return httpx.Response(200, json={"object": "list", "data": [model]})
        if path == "/tokenize":
            special = bool(body.get("add_special_tokens", True))
            ids = self.loaded.tokenizer(body["prompt"], add_special_tokens=special)["input_ids"]
            return httpx.Response(200, json={"tokens": ids, "count": len(ids)})
        if path == "/v1/completions":
            return self._complete(body)
        return httpx.Response(404, json={"detail": "Not Found"})

    def _complete(self, body: dict[str, Any]) -> httpx.Response:
        k = int(body.get("logprobs") or 0)
        if k > self.max_logprobs:
            message = (
                f"Requested sample logprobs of {k}, which is greater than max allowed: "
                f"{self.max_logprobs}"
            )
            return httpx.Response(400, json={"error": {"message": message, "code": 400}})
        ids = list(body["prompt"])
        params = {"temperature": body.get("temperature", 1.0)}
        row = self.logprobs(ids)[-1]
        token_id, reported = self.pick(row, params, torch.Generator().manual_seed(0))
        if self.raw:
            reported = row
        top = {f"token_id:{e[1]}": e[0] for e in _entries(reported, k)}
        top[f"token_id:{token_id}"] = float(reported[token_id])
        choice = {
            "index": 0,
            "text": "",
            "token_ids": [token_id],
            "logprobs": {"tokens": [f"token_id:{token_id}"], "top_logprobs": [top]},
            "finish_reason": "length",
        }
        usage = {"prompt_tokens": len(ids), "completion_tokens": 1}
        return httpx.Response(200, json={"choices": [choice], "usage": usage})


class _Lines(httpx.SyncByteStream):
    """A response body produced as it is read (closing it stops producing)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield from self._chunks

    def close(self) -> None:
        self.closed = True
