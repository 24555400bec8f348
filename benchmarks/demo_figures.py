"""Load times, speed and memory of the bundled pair on a few questions (the README's figures).

    python -m benchmarks.demo_figures [--max-tokens 128] [--threads 2]

Prints one JSON object and a table. The first-use conversion of the GGUF files is measured
only when the cache is empty (point $LANGCHAIN_NUDGING_CACHE at an empty folder to see it).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from rich.console import Console
from rich.table import Table

from langchain_nudging import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    ChatMessage,
    NudgingConfig,
    NudgingPair,
    Request,
)
from langchain_nudging.models import bundled_model_dir, load_model

QUESTIONS = [
    "Give me three tips for staying healthy.",
    "What is the capital of France? Explain briefly.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    figures: dict[str, object] = {"threads": args.threads, "max_tokens": args.max_tokens}
    for name in (BUNDLED_BASE_ID, BUNDLED_NUDGING_ID):
        start = time.perf_counter()
        bundled_model_dir(name, progress=False)
        figures[f"convert_or_find_s[{name}]"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        load_model(name, dtype="float32", device="cpu", progress=False)
        figures[f"load_s[{name}]"] = round(time.perf_counter() - start, 2)
    pair = NudgingPair.load(dtype="float32", device="cpu", progress=False)
    config = NudgingConfig(max_tokens=args.max_tokens)
    warm_up = Request([ChatMessage("user", "Hi")], NudgingConfig(max_tokens=4))
    list(pair.generate(warm_up))

    rows = []
    for question in QUESTIONS:
        generation = pair.generate(Request([ChatMessage("user", question)], config))
        for _ in generation:
            pass
        stats = generation.stats
        tokens = stats.base_tokens + stats.nudge_tokens
        rows.append(
            {
                "question": question[:40],
                "tokens": tokens,
                "seconds": round(stats.wall_time, 2),
                "tokens_per_s": round(tokens / stats.wall_time, 2),
                "first_segment_s": round(stats.time_to_first_segment or 0.0, 2),
                "nudged_share": round(stats.nudged_share, 3),
                "rounds": stats.rounds,
                "forward_passes": stats.forward_passes,
                "finish": stats.finish_reason,
            }
        )
    figures["answers"] = rows
    figures["peak_rss_gb"] = round(peak_rss_gb(), 2)
    print(json.dumps(figures))

    table = Table(title=f"bundled pair, float32, {args.threads} threads")
    columns = ("question", "tokens", "seconds", "tokens_per_s", "nudged_share", "rounds")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c]) for c in columns))
    Console().print(table)


if __name__ == "__main__":
    main()
