"""Throughput of the nudging engine against the base model alone and the uncached oracle.

    python -m benchmarks.throughput [--prompts 8] [--max-tokens 256] [--oracle-prompts 2]
        [--draft-tokens 4 8 16] [--threads 2] [--json PATH] [--data-dir ../shared/data]

One process, the same prompts and the same budget of new tokens for every path:
(a) the base model alone with transformers ``generate`` (greedy, KV cache, EOS suppressed with
``min_new_tokens`` so it writes exactly the budget): the floor; (b) the nudging engine, once per
``--draft-tokens`` value; (c) the uncached oracle (``reference_nudge``) on the first
``--oracle-prompts`` prompts, at the first ``--draft-tokens`` value. Each path runs once on a
short prompt before timing. Ratios are taken on ms per generated token. docs/benchmarks.md
explains the columns.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import GenerationConfig

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
from langchain_nudging.models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID
from langchain_nudging.reference import ReferenceModel, reference_nudge

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WARM_UP = [ChatMessage("user", "Hi")]
Row = dict[str, Any]
HEADERS = {  # summary key -> short table header (docs/benchmarks.md explains each)
    "prompt": "#",
    "tokens_base": "tok base",
    "tokens_engine": "tok eng",
    "tokens_oracle": "tok orc",
    "ms_per_token_base": "ms/tok base",
    "ms_per_token_engine": "ms/tok eng",
    "ms_per_token_oracle": "ms/tok orc",
    "engine_over_base": "eng/base",
    "oracle_over_engine": "orc/eng",
    "nudged_share": "nudged",
    "passes_engine_base": "fwd eng B",
    "passes_engine_nudging": "fwd eng N",
    "passes_oracle_base": "fwd orc B",
    "passes_oracle_nudging": "fwd orc N",
    "same_text_as_oracle": "=orc",
}


def load_prompts(data_dir: Path, count: int) -> list[str]:
    """The first instructions of just-eval-instruct and GSM8K questions, interleaved."""

    def first(name: str, key: str, n: int) -> list[str]:
        with open(data_dir / name, encoding="utf-8") as lines:
            return [json.loads(line)[key] for line, _ in zip(lines, range(n), strict=False)]

    instructions = first("just_eval_instruct_1000.jsonl", "instruction", count - count // 2)
    questions = first("gsm8k_test.jsonl", "question", count // 2)
    mixed = [p for pair in zip(instructions, questions, strict=False) for p in pair]
    return mixed + instructions[len(questions) :]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory() -> Row:
    """Peak resident memory of the process so far, and peak CUDA allocation since last reset."""
    row: Row = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)}
    if torch.cuda.is_available():
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    return row


def timed(run: Callable[[], Row], device: torch.device) -> Row:
    sync(device)
    start = time.perf_counter()
    row = run()
    sync(device)
    seconds = time.perf_counter() - start
    tokens = row["tokens"]
    ms = 1e3 * seconds / tokens if tokens else None
    return {**row, "seconds": round(seconds, 3), "ms_per_token": ms and round(ms, 2), **memory()}


@torch.inference_mode()
def base_alone(pair: NudgingPair, messages: list[ChatMessage], max_tokens: int) -> Row:
    """The floor: transformers ``generate`` on the engine's own base prompt, exactly N tokens."""
    prompt = pair.generate(messages).prompts.base
    model, text = pair.base.model, pair.base.text
    ids = torch.tensor([text.encode(prompt)], device=model.device)
    eos = sorted(text.stop_ids)
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,  # masks EOS so every run writes the full budget
        do_sample=False,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=text.tokenizer.pad_token_id or eos[0],
    )
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
    )
    tokens = out.shape[1] - ids.shape[1]
    return {"tokens": tokens, "forward_passes": {"base": tokens}}


def engine(pair: NudgingPair, messages: list[ChatMessage], config: NudgingConfig) -> Row:
    generation = pair.generate(messages, config)
    for _ in generation:
        pass
    stats = generation.stats
    return {
        "tokens": stats.base_tokens + stats.nudge_tokens,
        "nudged_share": round(stats.nudged_share, 3),
        "rounds": stats.rounds,
        "finish": stats.finish_reason,
        "forward_passes": stats.forward_passes,
        "tokens_processed": stats.tokens_processed,
        "text": generation.text,
    }


def oracle(
    pair: NudgingPair,
    refs: tuple[ReferenceModel, ReferenceModel],
    messages: list[ChatMessage],
    config: NudgingConfig,
) -> Row:
    generation = pair.generate(messages, config)  # the engine's prompts and stop strings
    for ref in refs:
        ref.forward_passes = ref.tokens_processed = 0
    prompts = generation.prompts
    run = reference_nudge(*refs, prompts.base, prompts.nudging, generation.config)
    return {
        "tokens": pair.base.text.count(run.text),
        "finish": run.finish_reason,
        "forward_passes": {"base": refs[0].forward_passes, "nudging": refs[1].forward_passes},
        "tokens_processed": {"base": refs[0].tokens_processed, "nudging": refs[1].tokens_processed},
        "text": run.text,
    }


def ratio(top: Row | None, bottom: Row | None) -> float | None:
    if not top or not bottom or not top["ms_per_token"] or not bottom["ms_per_token"]:
        return None
    return round(top["ms_per_token"] / bottom["ms_per_token"], 2)


def median(rows: list[Row], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def medians(rows: list[Row]) -> Row:
    skip = ("prompt", "same_text_as_oracle")
    return {key: median(rows, key) for key in rows[0] if key not in skip}


def summarize(base: list[Row], engine_rows: list[Row], oracle_rows: list[Row]) -> list[Row]:
    """One row per prompt joining the three paths, with the two ratios."""
    rows = []
    for i, (b, e) in enumerate(zip(base, engine_rows, strict=True)):
        o = oracle_rows[i] if i < len(oracle_rows) else None
        rows.append(
            {
                "prompt": i,
                "tokens_base": b["tokens"],
                "tokens_engine": e["tokens"],
                "tokens_oracle": o and o["tokens"],
                "ms_per_token_base": b["ms_per_token"],
                "ms_per_token_engine": e["ms_per_token"],
                "ms_per_token_oracle": o and o["ms_per_token"],
                "engine_over_base": ratio(e, b),
                "oracle_over_engine": ratio(o, e),
                "nudged_share": e["nudged_share"],
                "passes_engine_base": e["forward_passes"].get("base"),
                "passes_engine_nudging": e["forward_passes"].get("nudging"),
                "passes_oracle_base": o and o["forward_passes"]["base"],
                "passes_oracle_nudging": o and o["forward_passes"]["nudging"],
                "same_text_as_oracle": o and o["text"] == e["text"],
            }
        )
    return rows


def print_table(title: str, rows: list[Row]) -> None:
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(HEADERS[column], justify="right")
    for row in [*rows, {"prompt": "median", **medians(rows)}]:
        table.add_row(*("" if row.get(c) is None else str(row[c]) for c in rows[0]))
    Console(width=160).print(table)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--oracle-prompts", type=int, default=2)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--base", default=BUNDLED_BASE_ID)
    parser.add_argument("--nudging", default=BUNDLED_NUDGING_ID)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    prompts = [[ChatMessage("user", p)] for p in load_prompts(args.data_dir, args.prompts)]
    start = time.perf_counter()
    pair = NudgingPair.load(
        args.base, args.nudging, dtype=args.dtype, device=args.device, progress=False
    )
    load_s = round(time.perf_counter() - start, 2)
    device, refs = (
        pair.base.device,
        (
            ReferenceModel(pair.base.loaded),
            ReferenceModel(pair.nudging.loaded),
        ),
    )
    n, drafts = args.max_tokens, args.draft_tokens
    configs = {d: NudgingConfig(max_tokens=n, draft_tokens=d) for d in drafts}
    short = NudgingConfig(max_tokens=8, draft_tokens=drafts[0])
    results: Row = {
        "settings": {**{k: str(v) for k, v in vars(args).items()}, "threads": args.threads},
        "base_alone_stops": "min_new_tokens=max_tokens (EOS masked, always writes the budget)",
        "load_s": load_s,
        "after_load": memory(),
    }
    # Warm-up: one short run of each path, not timed.
    base_alone(pair, WARM_UP, 8)
    engine(pair, WARM_UP, short)
    if args.oracle_prompts:
        oracle(pair, refs, WARM_UP, short)

    base = [timed(lambda m=m: base_alone(pair, m, n), device) for m in prompts]
    engines = {
        d: [timed(lambda m=m, d=d: engine(pair, m, configs[d]), device) for m in prompts]
        for d in drafts
    }
    oracles = [
        timed(lambda m=m: oracle(pair, refs, m, configs[drafts[0]]), device)
        for m in prompts[: args.oracle_prompts]
    ]
    results |= {"base_alone": base, "engine": engines, "oracle": oracles, "summary": {}}
    for d in drafts:
        rows = summarize(base, engines[d], oracles if d == drafts[0] else [])
        results["summary"][d] = {"rows": rows, "medians": medians(rows)}
        print_table(
            f"{n} new tokens, draft_tokens={d}, {args.dtype} on {device}, "
            f"{args.threads} threads, load {load_s} s",
            rows,
        )
    results["peak"] = memory()
    print(
        f"peak RSS {results['peak']['peak_rss_mb']} MB; base alone: {results['base_alone_stops']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
