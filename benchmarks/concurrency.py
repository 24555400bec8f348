"""Many concurrent ``astream`` clients on one resident pair, against the same requests in turn.

    python -m benchmarks.concurrency [--clients 1 2 4 8 16] [--max-tokens 48] [--threads 2]
        [--json PATH]

For each client count ``c``, the first ``c`` prompts run (a) one after another and (b) as ``c``
concurrent ``astream`` calls on one ``NudgedChatModel`` (the pair's shared engine). Reported:
aggregate answer tokens per second, the concurrent / sequential throughput ratio, each
request's time to first streamed text (p50, p95) and the p50 / p95 gap between streamed chunks
(a chunk: one piece of streamed text). Also measured in the same process:

- the ideal: the pure batched-decode gain of each model, ``8 x (one batch-1 step) / (one batch-8
  step)`` for a one-token step on a cache of 256 tokens, and the same for a 64-id pass over an
  empty cache (a prompt). Weighted by where the 8 requests in turn spent their time (each
  model's one-token passes, its wider passes, and the rest), these give the ideal throughput
  ratio at 8 clients: every pass batched 8 at a time, nothing else changed;
- the first-round cost at ``c`` clients: the passes of the ``c`` requests' first rounds,
  batched (prompts on both models, the first draft, its verification). The last of ``c``
  requests shows no text before every one of them has decided its first words, so its time to
  first text is about this or more, whatever the schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from langchain_nudging import ChatMessage, NudgedChatModel, NudgingConfig, NudgingPair, Request
from langchain_nudging.backends.local import LocalModel, Step, forward_together
from langchain_nudging.config import SamplingConfig

from .measure import PassLog, load_prompts, local, pair_run_options

IDEAL_BATCH = 8
FILLER_ID = 1000  # any id both vocabularies have: pass cost does not depend on it


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
def batched_gain(model: LocalModel, width: int, past: int, batch: int = IDEAL_BATCH) -> dict:
    """``batch x t(batch 1) / t(batch)`` for one pass of ``width`` ids on ``past`` cached ones.

    Batch 1 and batch ``batch`` are timed in turn, 9 times each, and the medians compared, so
    that a machine whose speed drifts affects both alike.
    """
    net = model.model
    device = model.device
    caches, new = {}, {}
    for size in (1, batch):
        caches[size] = DynamicCache()
        if past:
            ids = torch.randint(100, 1000, (size, past), device=device)
            net(
                input_ids=ids,
                **{model.cache_argument: caches[size]},
                use_cache=True,
                logits_to_keep=1,
            )
        new[size] = torch.randint(100, 1000, (size, width), device=device)
    times: dict[int, list[float]] = {1: [], batch: []}
    for _ in range(9):
        for size, cache in caches.items():
            begin = time.perf_counter()
            net(
                input_ids=new[size],
                **{model.cache_argument: cache},
                use_cache=True,
                logits_to_keep=1,
            )
            times[size].append(time.perf_counter() - begin)
            cache.crop(-width)  # back to ``past`` tokens
    one_pass, many = statistics.median(times[1]), statistics.median(times[batch])
    return {
        "batch1_ms": round(1000 * one_pass, 1),
        f"batch{batch}_ms": round(1000 * many, 1),
        "gain": round(batch * one_pass / many, 2),
    }


def ideal_ratio(wall: float, passes: dict[str, list], gains: dict[str, dict]) -> float:
    """``wall`` over the in-turn run's time had every forward pass been batched ``IDEAL_BATCH``
    at a time: one-token passes at the step gain, wider ones at the prompt gain."""
    forward = sum(p.seconds for model in passes.values() for p in model)
    ideal = wall - forward  # the rest (tokenizing, stop rules, streaming) as it was
    for name, model in passes.items():
        gain = gains[name]
        ideal += sum(p.seconds for p in model if p.new == 1) / gain["decode"]["gain"]
        ideal += sum(p.seconds for p in model if p.new > 1) / gain["prompt"]["gain"]
    return round(wall / ideal, 2)


def first_round_cost(pair: NudgingPair, prompts: list[str], draft_tokens: int) -> float:
    """Seconds of the passes every one of these requests needs before it can show text, each
    batched across the requests: the nudging model reads each prompt (whose logits give the
    draft's first token) and writes the rest of the first draft a token at a time; the base
    model reads each prompt with the draft, asked at each position. The first text is the
    first round's accepted words, so the last request's first text comes after all of this.
    Prompts are read all batched or one by one, whichever is faster here."""
    rendered = [pair.generate(Request([ChatMessage("user", p)])).prompts for p in prompts]
    total = 0.0
    for model, texts, draft, steps in (
        (local(pair.nudging), [r.nudging for r in rendered], 0, draft_tokens - 1),
        (local(pair.base), [r.base for r in rendered], draft_tokens, 0),
    ):
        read, after = run_passes(model, texts, draft, steps, together=True)
        alone, _ = run_passes(model, texts, draft, 0, together=False)
        total += min(read, alone) + after
    return total


@torch.inference_mode()
def run_passes(
    model: LocalModel, texts: Sequence[str], draft: int, steps: int, together: bool
) -> tuple[float, float]:
    """Seconds to read each text followed by ``draft`` ids (logits at each of those) in fresh
    sessions, then seconds for ``steps`` one-token steps of every session; batched, or one
    session at a time."""
    sessions = [model.session(text, SamplingConfig()) for text in texts]

    def run(passes: list[Step]) -> float:
        begin = time.perf_counter()
        for group in [passes] if together else [[one] for one in passes]:
            forward_together(model, group)
        return time.perf_counter() - begin

    reads = []
    for session, text in zip(sessions, texts, strict=True):
        ids = model.text.encode(text) + [FILLER_ID] * draft
        reads.append(Step(session.kv, ids, list(range(len(ids) - 1 - draft, len(ids)))))
    read = run(reads)
    after = sum(run([Step(s.kv, [FILLER_ID], [0]) for s in sessions]) for _ in range(steps))
    for session in sessions:
        session.close()
    return read, after


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
    models = (local(pair.base), local(pair.nudging))
    gains = {
        lm.name: {"decode": batched_gain(lm, width=1, past=256), "prompt": batched_gain(lm, 64, 0)}
        for lm in models
    }
    log = PassLog({lm.name: lm.model for lm in models})
    rows: dict[str, Any] = {}
    table = Table(title=f"Concurrent astream clients, {args.max_tokens} tokens each")
    for column in (
        "clients",
        "tok/s together",
        "tok/s in turn",
        "ratio",
        "TTFT p50/p95 ms",
        "TTFT p95 alone",
        "first round ms",
        "gap p50/p95 ms",
    ):
        table.add_column(column)
    for clients in args.clients:
        batch = prompts[:clients]
        with log.recording() as passes:
            wall, results = asyncio.run(sequential(model, batch))
        in_turn = summarize(wall, results)
        together = summarize(*asyncio.run(concurrent(model, batch)))
        ratio = round(together["tokens_per_s"] / in_turn["tokens_per_s"], 2)
        first_round = round(1000 * first_round_cost(pair, batch, NudgingConfig().draft_tokens))
        rows[str(clients)] = {
            "concurrent": together,
            "sequential": in_turn,
            "ratio": ratio,
            "first_round_ms": first_round,
        }
        if clients == IDEAL_BATCH:
            rows[str(clients)]["ideal_ratio"] = ideal_ratio(wall, passes, gains)
        table.add_row(
            str(clients),
            str(together["tokens_per_s"]),
            str(in_turn["tokens_per_s"]),
            str(ratio),
            f"{together['ttft_p50_ms']}/{together['ttft_p95_ms']}",
            str(in_turn["ttft_p95_ms"]),
            str(first_round),
            f"{together['gap_p50_ms']}/{together['gap_p95_ms']}",
        )
    console = Console()
    console.print(table)
    console.print(f"batched gains at batch {IDEAL_BATCH}: {gains}")
    if str(IDEAL_BATCH) in rows:
        console.print(
            f"ideal ratio at {IDEAL_BATCH} clients: {rows[str(IDEAL_BATCH)]['ideal_ratio']}"
        )
    summary = {"threads": args.threads, "max_tokens": args.max_tokens, "gains": gains, **rows}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
