"""The bundled pair on llama.cpp servers: nudged against the base model alone on the same server.

    python -m benchmarks.servers [--prompts 6] [--max-tokens 128] [--threads 1]
        [--transformers] [--constrained] [--json docs/servers.json]

Starts two llama.cpp servers (xllamacpp, 127.0.0.1) for the bundled GGUF files and runs, on
the same prompts in one process:

* **base alone, raw**: one ``/completion`` of ``--max-tokens`` tokens on the base server
  (``ignore_eos``): the floor, ms per token of the server generating by itself;
* **base alone, library**: ``Request(mode="base")`` through the same backend (its windows,
  stop rules and token counting);
* **nudged**: the pair, windows streamed (the default), then again with windows asked in
  chunks of 8 tokens (``window_chunk=8``): the choice docs/servers.md explains.

Per nudged answer it reads the servers' own counters (``/metrics``): prompt tokens each server
evaluated against what it had to (its prompt plus the answer, in its tokens), generated tokens,
and the servers' compute seconds (``prompt_seconds_total + tokens_predicted_seconds_total``),
against the wall time; and the HTTP calls the client made, per answer token. With
``--transformers`` it also runs the bundled pair in this process (transformers, float32) on
the same prompts, for tokens per second on each runtime; with ``--constrained``, nudged answers
under a JSON schema and a forced tool call (benchmarks/constrained.py's specs) against none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
from langchain_nudging.backends.http import ServerClient
from langchain_nudging.backends.llamacpp import LlamaCppModel
from langchain_nudging.backends.llamacpp_runtime import LlamaCppServer, ServerSettings
from langchain_nudging.models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID
from langchain_nudging.models.bundled import bundled_gguf
from langchain_nudging.prompts import render_prompts
from langchain_nudging.request import Request

from .measure import DATA_DIR, load_prompts

COUNTERS = (
    "prompt_tokens_total",
    "tokens_predicted_total",
    "prompt_seconds_total",
    "tokens_predicted_seconds_total",
)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("llamacpp:") and name[9:] in COUNTERS:
            found[name[9:]] = float(value)
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def compute_seconds(d: dict[str, float]) -> float:
    return d["prompt_seconds_total"] + d["tokens_predicted_seconds_total"]


def erase_slots(url: str) -> None:
    """Replace every slot's cache by a one-token prompt, so that a run reads its prompt as a
    new request would (``?action=erase`` needs a server started with ``--slot-save-path``)."""
    for slot in httpx.get(f"{url}/slots", timeout=30, trust_env=False).json():
        body = {"prompt": [0], "n_predict": 1, "id_slot": slot["id"], "cache_prompt": True}
        httpx.post(f"{url}/completion", json=body, timeout=30, trust_env=False)


def raw_base(model: LlamaCppModel, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The base server generating ``max_tokens`` by itself (one completion, EOS ignored)."""
    erase_slots(model.url)
    ids = model.encode(prompt)
    body = {
        "prompt": ids,
        "n_predict": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
    }
    start = time.perf_counter()
    answer = model.client.post("/completion", body)
    wall = time.perf_counter() - start
    timings = answer["timings"]
    return {
        "tokens": timings["predicted_n"],
        "wall_s": wall,
        # Like the other rows, the prompt's reading included; decoding alone beside it.
        "ms_per_token": 1000 * wall / max(1, timings["predicted_n"]),
        "decode_ms_per_token": timings["predicted_ms"] / max(1, timings["predicted_n"]),
    }


def run_pair(
    pair: NudgingPair, messages: list[ChatMessage], config: NudgingConfig, mode: str
) -> dict[str, Any]:
    models = [m for m in (pair.base, pair.nudging) if isinstance(m, LlamaCppModel)]
    for model in models:
        erase_slots(model.url)
    before = {m.url: metrics(m.url) for m in models}
    calls = {m.url: m.client.calls for m in models}
    start = time.perf_counter()
    generation = pair.generate(Request(messages, config, mode=mode))  # type: ignore[arg-type]
    list(generation)
    wall = time.perf_counter() - start
    stats = generation.stats
    tokens = stats.base_tokens + stats.nudge_tokens
    row: dict[str, Any] = {
        "mode": mode,
        "tokens": tokens,
        "wall_s": wall,
        "ms_per_token": 1000 * wall / max(1, tokens),
        "nudged_share": stats.nudge_tokens / max(1, tokens),
    }
    if not models:
        return row
    prompts = render_prompts(messages, pair.nudging.chat_template, pair.base_format)
    compute = 0.0
    http_calls = 0
    predicted = 0.0
    for model, prompt in ((pair.base, prompts.base), (pair.nudging, prompts.nudging)):
        if not isinstance(model, LlamaCppModel) or model.url not in before:
            continue
        d = delta(metrics(model.url), before.pop(model.url))
        compute += compute_seconds(d)
        http_calls += model.client.calls - calls[model.url]
        predicted += d["tokens_predicted_total"]
        used = mode == "nudged" or (mode == "base") == (model is pair.base)
        if not used:
            continue
        needed = model.prompt_tokens(prompt) + len(model.tokenize(generation.text))
        role = "base" if model is pair.base else "nudging"
        row[f"{role}_prompt_evaluated"] = d["prompt_tokens_total"]
        row[f"{role}_prompt_needed"] = needed
        row[f"{role}_evaluated_over_needed"] = d["prompt_tokens_total"] / max(1, needed)
        row[f"{role}_predicted"] = d["tokens_predicted_total"]
    row["server_compute_s"] = compute
    # Tokens the servers generated per answer token: streams closed at a window's end still
    # run a token or two ahead; one-token questions generate one token each.
    row["generated_per_token"] = predicted / max(1, tokens)
    row["wall_over_compute"] = wall / compute if compute else None
    row["http_calls_per_token"] = http_calls / max(1, tokens)
    return row


def constrained(pair: NudgingPair, prompt: str, name: str, max_tokens: int) -> dict[str, Any]:
    """A nudged answer under one of benchmarks/constrained.py's output specs, on the servers."""
    from .constrained import SPECS

    spec = SPECS[name]
    models = [m for m in (pair.base, pair.nudging) if isinstance(m, LlamaCppModel)]
    calls = sum(m.client.calls for m in models)
    request = Request(
        [ChatMessage("user", prompt)], NudgingConfig(max_tokens=max_tokens), output=spec
    )
    start = time.perf_counter()
    generation = pair.generate(request)
    list(generation)
    wall = time.perf_counter() - start
    stats = generation.stats
    tokens = max(1, stats.base_tokens + stats.nudge_tokens)
    valid = None
    if spec.constrained:
        try:
            spec.parse(generation.text)
            valid = 1.0
        except ValueError:
            valid = 0.0
    return {
        "tokens": tokens,
        "ms_per_token": 1000 * wall / tokens,
        "http_calls_per_token": (sum(m.client.calls for m in models) - calls) / tokens,
        "candidates_checked_per_token": sum(stats.grammar_masks.values()) / tokens,
        "parses": valid,
    }


def median(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="per server, and for torch")
    parser.add_argument("--transformers", action="store_true")
    parser.add_argument(
        "--constrained", action="store_true", help="also JSON-schema and tool-call answers"
    )
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    settings = ServerSettings(threads=args.threads, cache_ram_mib=0)
    base_server = LlamaCppServer(bundled_gguf(BUNDLED_BASE_ID), settings)
    nudging_server = LlamaCppServer(bundled_gguf(BUNDLED_NUDGING_ID), settings)
    try:
        streamed = NudgingPair(
            LlamaCppModel(ServerClient(base_server.url)),
            LlamaCppModel(ServerClient(nudging_server.url)),
        )
        chunked = NudgingPair(
            LlamaCppModel(ServerClient(base_server.url), window_chunk=8),
            LlamaCppModel(ServerClient(nudging_server.url), window_chunk=8),
        )
        prompts = load_prompts(args.data, args.prompts)
        config = NudgingConfig(max_tokens=args.max_tokens)
        warm = [ChatMessage("user", "Hi")]
        run_pair(streamed, warm, NudgingConfig(max_tokens=8), "nudged")
        rows: dict[str, list[dict[str, Any]]] = {
            "base raw": [],
            "base library": [],
            "nudged streamed": [],
            "nudged chunks of 8": [],
        }
        for text in prompts:
            messages = [ChatMessage("user", text)]
            base_prompt = render_prompts(messages, None, streamed.base_format).base
            assert isinstance(streamed.base, LlamaCppModel)
            rows["base raw"].append(raw_base(streamed.base, base_prompt, args.max_tokens))
            rows["base library"].append(run_pair(streamed, messages, config, "base"))
            rows["nudged streamed"].append(run_pair(streamed, messages, config, "nudged"))
            rows["nudged chunks of 8"].append(run_pair(chunked, messages, config, "nudged"))
        if args.constrained:
            for name in ("none", "json schema", "tool call"):
                rows[f"constrained: {name}"] = [
                    constrained(streamed, text, name, args.max_tokens) for text in prompts
                ]
        if args.transformers:
            import torch

            torch.set_num_threads(args.threads)
            local = NudgingPair.load(dtype="float32", device="cpu")
            run_pair(local, warm, NudgingConfig(max_tokens=8), "nudged")
            rows["transformers base"] = []
            rows["transformers nudged"] = []
            for text in prompts:
                messages = [ChatMessage("user", text)]
                rows["transformers base"].append(run_pair(local, messages, config, "base"))
                rows["transformers nudged"].append(run_pair(local, messages, config, "nudged"))
    finally:
        base_server.stop()
        nudging_server.stop()

    keys = (
        "ms_per_token",
        "tokens",
        "nudged_share",
        "http_calls_per_token",
        "base_evaluated_over_needed",
        "nudging_evaluated_over_needed",
        "generated_per_token",
        "wall_over_compute",
        "candidates_checked_per_token",
        "parses",
    )
    short = (
        "ms/tok",
        "tokens",
        "nudged",
        "calls/tok",
        "base eval",
        "nudging eval",
        "gen/tok",
        "wall/compute",
        "checks/tok",
        "parses",
        "x base raw",
    )
    summary = {name: {k: median(r, k) for k in keys} for name, r in rows.items()}
    for values in summary.values():
        if values["ms_per_token"] is not None:
            values["ms_per_token"] = round(values["ms_per_token"], 1)
    floor = summary["base raw"]["ms_per_token"]
    for values in summary.values():
        ms = values["ms_per_token"]
        values["over_base_raw"] = round(ms / floor, 2) if ms and floor else None
    table = Table(title=f"{len(prompts)} prompts, {args.max_tokens} tokens, medians")
    table.add_column("run")
    for label in short:
        table.add_column(label, justify="right")
    for name, values in summary.items():
        table.add_row(name, *(str(values.get(k)) for k in (*keys, "over_base_raw")))
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"data": str(args.data), "json": str(args.json)},
                    "summary": summary,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n",
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
