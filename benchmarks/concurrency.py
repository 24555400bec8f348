"""Many concurrent ``astream`` clients on one resident pair, against the same requests in turn.

    python -m benchmarks.concurrency [--clients 1 2 4 8 16] [--max-tokens 48] [--threads 2]
        [--json PATH]

For each client count ``c``, the first ``c`` prompts run (a) one after another and (b) as ``c``
concurrent ``astream`` calls on one ``NudgedChatModel`` (the pair's shared engine). Reported:
aggregate answer tokens per second, the concurrent / sequential throughput ratio, each
request's time to first streamed text (p50, p95) and the p50 / p95 gap between streamed chunks
(a chunk is a segment: one or more tokens). Also measured in the same process, the ideal: the
pure batched-decode gain of each model, ``8 x (one batch-1 step) / (one batch-8 step)`` for a
one-token step on a cache of 256 tokens, which bounds what batching requests can win.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from langchain_nudging import NudgedChatModel, NudgingPair
from langchain_nudging.backends.local import LocalModel

from .measure import load_prompts, pair_run_options


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one(model: NudgedChatModel, prompt: str, start: float) -> dict[str, Any]:
    """One streamed request: when text first arrived, the gaps between chunks, the tokens."""
    first: float | None = None
    last = start
    gaps: list[float] = []
    tokens = 0
    async for chunk in model.astream(prompt):
        now = time.perf_counter()
        if chunk.content:
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
        if chunk.usage_metadata:
            tokens = chunk.usage_metadata["output_tokens"]
    return {"ttft": first, "gaps": gaps, "tokens": tokens}


async def concurrent(model: NudgedChatModel, prompts: list[str]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    results = await asyncio.gather(*(one(model, p, start) for p in prompts))
    return time.perf_counter() - start, list(results)


async def sequential(model: NudgedChatModel, prompts: list[str]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    results = [await one(model, p, time.perf_counter()) for p in prompts]
    return time.perf_counter() - start, results


@torch.inference_mode()
def batched_decode_gain(model: LocalModel, batch: int = 8, past: int = 256) -> dict[str, float]:
    """``batch x t(batch 1) / t(batch)`` for one one-token step on a cache of ``past`` tokens."""
    net = model.model
    device = model.device

    def step_seconds(size: int) -> float:
        ids = torch.randint(100, 1000, (size, past), device=device)
        cache = DynamicCache()
        net(input_ids=ids, **{model.cache_argument: cache}, use_cache=True, logits_to_keep=1)
        token = torch.randint(100, 1000, (size, 1), device=device)
        times = []
        for _ in range(5):
            begin = time.perf_counter()
            net(input_ids=token, **{model.cache_argument: cache}, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - begin)
            cache.crop(-1)  # back to ``past`` tokens
        return statistics.median(times)

    one_step, many = step_seconds(1), step_seconds(batch)
    return {
        "batch1_ms": round(1000 * one_step, 1),
        f"batch{batch}_ms": round(1000 * many, 1),
        "gain": round(batch * one_step / many, 2),
    }


def summarize(wall: float, results: list[dict]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value)

    return {
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": ms(percentile(ttfts, 0.5)),
        "ttft_p95_ms": ms(percentile(ttfts, 0.95)),
        "gap_p50_ms": ms(percentile(gaps, 0.5)),
        "gap_p95_ms": ms(percentile(gaps, 0.95)),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.concurrency")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=48)
    pair_run_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = NudgingPair.load(dtype="float32", device="cpu")
    model = NudgedChatModel(max_tokens=args.max_tokens, dtype="float32", device="cpu")
    prompts = load_prompts(args.data, max(args.clients))
    asyncio.run(sequential(model, ["Hi"]))  # warm-up
    ideal = {
        "base": batched_decode_gain(pair.base),
        "nudging": batched_decode_gain(pair.nudging),
    }
    rows: dict[str, Any] = {}
    table = Table(title=f"Concurrent astream clients, {args.max_tokens} tokens each")
    for column in (
        "clients",
        "tok/s together",
        "tok/s in turn",
        "ratio",
        "TTFT p50/p95 ms",
        "gap p50/p95 ms",
    ):
        table.add_column(column)
    for clients in args.clients:
        batch = prompts[:clients]
        in_turn = summarize(*asyncio.run(sequential(model, batch)))
        together = summarize(*asyncio.run(concurrent(model, batch)))
        ratio = round(together["tokens_per_s"] / in_turn["tokens_per_s"], 2)
        rows[str(clients)] = {"concurrent": together, "sequential": in_turn, "ratio": ratio}
        table.add_row(
            str(clients),
            str(together["tokens_per_s"]),
            str(in_turn["tokens_per_s"]),
            str(ratio),
            f"{together['ttft_p50_ms']}/{together['ttft_p95_ms']}",
            f"{together['gap_p50_ms']}/{together['gap_p95_ms']}",
        )
    console = Console()
    console.print(table)
    console.print(f"ideal batched-decode gain at batch 8 (one-token step, 256 cached): {ideal}")
    summary = {"threads": args.threads, "max_tokens": args.max_tokens, "ideal": ideal, **rows}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
