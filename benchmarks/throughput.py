"""Throughput of the nudging engine against the base model alone and the uncached oracle.

    python -m benchmarks.throughput [--prompts 8] [--max-tokens 256] [--oracle-prompts 2]
        [--draft-tokens 16 8 4] [--growth 64 128 256 512] [--threads 2] [--json PATH]

One process, the same prompts and the same budget of new tokens for every path: (a) the base
model alone with transformers ``generate`` (greedy, KV cache, EOS masked so it writes exactly
the budget): the floor; (b) the nudging engine, once per ``--draft-tokens`` value, and once
more at the first value with draft boundaries verified one pass at a time (the ablation of
batched verification); (c) the uncached oracle on the first ``--oracle-prompts`` prompts. The
engine's forward passes at the first draft value are replayed in isolation for the
required-cost model. ``--growth`` runs the first prompt at several answer lengths.
docs/performance.md explains every column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair
from langchain_nudging.models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID
from langchain_nudging.reference import ReferenceModel

from .measure import (
    DATA_DIR,
    PassLog,
    Row,
    base_alone,
    engine,
    load_prompts,
    local,
    memory,
    oracle,
    required_cost,
    timed,
)

WARM_UP = [ChatMessage("user", "Hi")]
PAIR_RATIO = 10  # the projection: a nudging model whose decode step costs 1/10 of the base's


def ratio(top: float | None, bottom: float | None) -> float | None:
    return round(top / bottom, 2) if top and bottom else None


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def project(base: Row, run: Row) -> float | None:
    """Engine / base alone if the nudging model's step cost 1/PAIR_RATIO of the base model's."""
    cost = run.get("required_by_model")
    if not cost or "nudging" not in cost or not run["tokens"]:
        return None
    b, n = cost["base"], cost["nudging"]
    scaled = n["seconds"] * (b["step_ms"] / PAIR_RATIO) / n["step_ms"]
    seconds = (b["seconds"] + scaled) * run["efficiency"]
    return round(1e3 * seconds / run["tokens"] / base["ms_per_token"], 2)


def per_prompt(base: list[Row], runs: list[Row], oracles: list[Row]) -> list[Row]:
    rows = []
    for i, (b, e) in enumerate(zip(base, runs, strict=True)):
        o = oracles[i] if i < len(oracles) else {}
        rows.append(
            {
                "#": i,
                "tok base": b["tokens"],
                "tok eng": e["tokens"],
                "tok orc": o.get("tokens"),
                "ms/tok base": b["ms_per_token"],
                "ms/tok eng": e["ms_per_token"],
                "ms/tok orc": o.get("ms_per_token"),
                "eng/base": ratio(e["ms_per_token"], b["ms_per_token"]),
                "orc/eng": ratio(o.get("ms_per_token"), e["ms_per_token"]),
                "nudged": e["nudged_share"],
                "fwd B/N eng": "{base}/{nudging}".format(**e["forward_passes"]),
                "fwd B/N orc": "{base}/{nudging}".format(**o["forward_passes"]) if o else None,
                "required s": e.get("required_s"),
                "eng/required": e.get("efficiency"),
                "10:1 eng/base": project(b, e),
                "=orc": o["text"] == e["text"] if o else None,
            }
        )
    return rows


def with_medians(rows: list[Row], label: str = "median") -> list[Row]:
    keys = [k for k in rows[0] if k != "#"]
    numeric = {
        k: median([r[k] for r in rows])
        for k in keys
        if all(isinstance(r[k], int | float) or r[k] is None for r in rows)
        and not any(isinstance(r[k], bool) for r in rows)
    }
    return [*rows, {"#": label, **numeric}]


def print_table(title: str, rows: list[Row]) -> None:
    table = Table(title=title, title_justify="left")
    columns = list(rows[0])
    for column in columns:
        table.add_column(str(column), justify="right")
    for row in rows:
        table.add_row(*("" if row.get(c) in (None, "") else str(row[c]) for c in columns))
    Console(width=200).print(table)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--oracle-prompts", type=int, default=2, help="0 skips the oracle")
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[16, 8, 4])
    parser.add_argument(
        "--ablation-prompts",
        type=int,
        default=None,
        help="prompts for the one-by-one verification ablation (default: all; 0 skips it)",
    )
    parser.add_argument(
        "--growth", type=int, nargs="*", default=[64, 128, 256, 512], help="answer lengths"
    )
    parser.add_argument(
        "--growth-oracle-max", type=int, default=512, help="longest growth length for the oracle"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--base", default=BUNDLED_BASE_ID)
    parser.add_argument("--nudging", default=BUNDLED_NUDGING_ID)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


class Bench:
    """The loaded pair, the oracle over the same weights, and the pass log."""

    def __init__(self, args: argparse.Namespace) -> None:
        start = time.perf_counter()
        self.pair = NudgingPair.load(
            args.base, args.nudging, dtype=args.dtype, device=args.device, progress=False
        )
        self.load_s = round(time.perf_counter() - start, 2)
        base, nudging = local(self.pair.base), local(self.pair.nudging)
        self.device = base.device
        self.refs = (ReferenceModel(base.loaded), ReferenceModel(nudging.loaded))
        self.log = PassLog({"base": base.model, "nudging": nudging.model})

    def base(self, messages: list[ChatMessage], n: int) -> Row:
        return timed(lambda: base_alone(self.pair, messages, n), self.device, self.log)

    def engine(
        self,
        messages: list[ChatMessage],
        config: NudgingConfig,
        *,
        replay: bool = False,
        one_by_one: bool = False,
    ) -> Row:
        """One engine run; with ``replay``, its passes are then timed again in isolation."""
        row = timed(
            lambda: engine(self.pair, messages, config, one_by_one=one_by_one),
            self.device,
            self.log,
        )
        return row | required_cost(self.pair, row) if replay else row

    def oracle(self, messages: list[ChatMessage], config: NudgingConfig) -> Row:
        return timed(lambda: oracle(self.pair, self.refs, messages, config), self.device, self.log)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts = [[ChatMessage("user", p)] for p in load_prompts(args.data_dir, args.prompts)]
    bench = Bench(args)
    n, drafts = args.max_tokens, args.draft_tokens
    main_config = NudgingConfig(max_tokens=n, draft_tokens=drafts[0])
    results: Row = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "device": str(bench.device),
        "load_s": bench.load_s,
        "after_load": memory(),
    }
    # Warm-up, not timed: one short run of each path.
    short = NudgingConfig(max_tokens=8, draft_tokens=drafts[0])
    bench.base(WARM_UP, 8)
    bench.engine(WARM_UP, short)
    if args.oracle_prompts:
        bench.oracle(WARM_UP, short)

    base = [bench.base(m, n) for m in prompts]
    runs: dict[int, list[Row]] = {}
    for d in drafts:
        config = main_config.model_copy(update={"draft_tokens": d})
        runs[d] = [bench.engine(m, config, replay=d == drafts[0]) for m in prompts]
    ablation_count = len(prompts) if args.ablation_prompts is None else args.ablation_prompts
    one_by_one = [bench.engine(m, main_config, one_by_one=True) for m in prompts[:ablation_count]]
    oracles = [bench.oracle(m, main_config) for m in prompts[: args.oracle_prompts]]
    growth = []
    for length in args.growth:
        config = main_config.model_copy(update={"max_tokens": length})
        growth.append(
            {
                "max_tokens": length,
                "base": bench.base(prompts[0], length),
                "engine": bench.engine(prompts[0], config),
                "oracle": bench.oracle(prompts[0], config)
                if length <= args.growth_oracle_max
                else None,
            }
        )
    results["peak"] = memory()

    title = (
        f"{n} new tokens, {args.dtype} on {bench.device}, {args.threads} threads, "
        f"load {bench.load_s} s"
    )
    main_rows = with_medians(per_prompt(base, runs[drafts[0]], oracles))
    print_table(f"{title}, draft_tokens={drafts[0]}", main_rows)
    base_ms = median([b["ms_per_token"] for b in base])
    sweep = [
        {
            "draft_tokens": d,
            "ms/tok eng": median([r["ms_per_token"] for r in runs[d]]),
            "ms/tok base": base_ms,
            "eng/base": median(
                [
                    ratio(r["ms_per_token"], b["ms_per_token"])
                    for r, b in zip(runs[d], base, strict=True)
                ]
            ),
            "nudged": median([r["nudged_share"] for r in runs[d]]),
            "fwd base": median([r["forward_passes"]["base"] for r in runs[d]]),
            "fwd nudging": median([r["forward_passes"]["nudging"] for r in runs[d]]),
            "same text as draft 16": sum(
                r["text"] == s["text"] for r, s in zip(runs[d], runs[drafts[0]], strict=True)
            ),
        }
        for d in drafts
    ]
    print_table("draft_tokens sweep (medians over prompts)", sweep)
    ablation = []
    for label, rows in (
        ("batched (one pass)", runs[drafts[0]][:ablation_count]),
        ("one by one", one_by_one),
    ):
        if rows:
            ablation.append(
                {
                    "verification": label,
                    "ms/tok eng": median([r["ms_per_token"] for r in rows]),
                    "fwd base": median([r["forward_passes"]["base"] for r in rows]),
                    "base fwd s": median([r["forward_seconds"]["base"] for r in rows]),
                    "engine s": median([r["seconds"] for r in rows]),
                }
            )
    if len(ablation) == 2:
        print_table(
            f"draft boundary verification, draft_tokens={drafts[0]}, {ablation_count} prompts",
            ablation,
        )
    profile = [
        {
            "#": i,
            "oracle s": o["seconds"],
            "re-reading s": o["from_scratch_seconds"],
            "oracle s without re-reading": round(o["seconds"] - o["from_scratch_seconds"], 3),
            "engine s": e["seconds"],
            "orc/eng": ratio(o["seconds"], e["seconds"]),
            "orc/eng without re-reading": ratio(
                o["seconds"] - o["from_scratch_seconds"], e["seconds"]
            ),
        }
        for i, (o, e) in enumerate(zip(oracles, runs[drafts[0]], strict=False))
    ]
    if profile:
        print_table(
            "where the oracle's time goes (re-reading: passes over an empty cache)", profile
        )
    growth_rows = [
        {
            "max_tokens": g["max_tokens"],
            "tok eng": g["engine"]["tokens"],
            "base s": g["base"]["seconds"],
            "engine s": g["engine"]["seconds"],
            "oracle s": g["oracle"] and g["oracle"]["seconds"],
            "ms/tok base": g["base"]["ms_per_token"],
            "ms/tok eng": g["engine"]["ms_per_token"],
            "ms/tok orc": g["oracle"] and g["oracle"]["ms_per_token"],
            "eng/base": ratio(g["engine"]["ms_per_token"], g["base"]["ms_per_token"]),
            "orc/eng": g["oracle"]
            and ratio(g["oracle"]["ms_per_token"], g["engine"]["ms_per_token"]),
        }
        for g in growth
    ]
    if growth_rows:
        print_table("growth with answer length, prompt 0", growth_rows)
    print(f"peak RSS {results['peak']['peak_rss_mb']} MB")

    def public(row: Row) -> Row:
        return {k: v for k, v in row.items() if k != "passes"}

    results |= {
        "base_alone": [public(r) for r in base],
        "engine": {d: [public(r) for r in rows] for d, rows in runs.items()},
        "engine_one_by_one": [public(r) for r in one_by_one],
        "oracle": [public(r) for r in oracles],
        "growth": [
            {k: v if not isinstance(v, dict) else public(v) for k, v in g.items()} for g in growth
        ],
        "tables": {
            "oracle_profile": profile,
            "per_prompt": main_rows,
            "draft_sweep": sweep,
            "verification": ablation,
            "growth": growth_rows,
        },
    }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
