"""How evenly an answer streams: the gaps between successive ``astream`` chunks.

    python -m benchmarks.streaming [--smoke] [--prompts 8] [--max-tokens 64] [--threads 2]
        [--json PATH]

The bundled pair behind ``NudgedChatModel`` (greedy, float32, CPU) answers a fixed list of
prompts one after another, streamed. For every chunk that carries text the time since the
previous one is recorded (the first chunk's is the time to first text). Printed as one JSON
line: the gap p50/p95/max in milliseconds, the number of chunks, their mean and largest size
in characters, the time to first text (p50) and the answer tokens. A chat UI shows a steady
flow when the gaps are short and even; a chunk per segment shows bursts (docs/algorithm.md,
"Streaming"). ``--smoke``: the first three prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch

from langchain_nudging import NudgedChatModel

PROMPTS = (
    "Give me three tips for staying healthy.",
    "Explain to a child what a prime number is.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Write a short poem about the sea.",
    "How do I make a cup of green tea?",
    "List five red fruits, one per line.",
    "Why is the sky blue?",
    "Describe a pirate ship in two sentences.",
)
SMOKE_PROMPTS = 3


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of ``values`` (``None`` when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def stream_one(model: NudgedChatModel, prompt: str) -> dict[str, Any]:
    """One streamed answer: time to first text, the gaps between text chunks, chunk sizes."""
    start = time.perf_counter()
    last = start
    first: float | None = None
    gaps: list[float] = []
    sizes: list[int] = []
    tokens = 0
    async for chunk in model.astream(prompt):
        now = time.perf_counter()
        if isinstance(chunk.content, str) and chunk.content:
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            sizes.append(len(chunk.content))
            last = now
        if chunk.usage_metadata:
            tokens = chunk.usage_metadata["output_tokens"]
    return {"ttft": first, "gaps": gaps, "sizes": sizes, "tokens": tokens}


def summarize(results: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    gaps = [g for r in results for g in r["gaps"]]
    sizes = [s for r in results for s in r["sizes"]]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]

    def ms(value: float | None) -> float | None:
        return None if value is None else round(1000 * value, 1)

    return {
        "benchmark": "streaming",
        "prompts": len(results),
        "max_tokens": max_tokens,
        "tokens": sum(r["tokens"] for r in results),
        "chunks": len(sizes),
        "chars_per_chunk_mean": round(sum(sizes) / len(sizes), 2) if sizes else None,
        "chars_per_chunk_max": max(sizes, default=None),
        "gap_p50_ms": ms(percentile(gaps, 0.5)),
        "gap_p95_ms": ms(percentile(gaps, 0.95)),
        "gap_max_ms": ms(max(gaps, default=None)),
        "ttft_p50_ms": ms(percentile(ttfts, 0.5)),
    }


async def run(model: NudgedChatModel, prompts: list[str]) -> list[dict[str, Any]]:
    return [await stream_one(model, prompt) for prompt in prompts]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming")
    parser.add_argument("--smoke", action="store_true", help=f"the first {SMOKE_PROMPTS} prompts")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    count = SMOKE_PROMPTS if args.smoke else args.prompts
    prompts = list(PROMPTS[:count])
    model = NudgedChatModel(max_tokens=args.max_tokens, dtype="float32", device="cpu")
    asyncio.run(run(model, ["Hi"]))  # loads the pair and warms it up
    summary = summarize(asyncio.run(run(model, prompts)), args.max_tokens)
    line = json.dumps(summary)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return summary


if __name__ == "__main__":
    main()
