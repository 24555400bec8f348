"""Does a repetition control help the bundled pair on IFEval? A paired comparison.

The same IFEval sample is answered by the nudged pair with the controls off and with one
setting on (both models), through the evaluation runner; the report's paired bootstrap gives
the interval of the difference in each example's score (docs/generation.md keeps the figures).

    nice python benchmarks/repetition_ifeval.py --limit 48 --max-tokens 128 \
        --setting repetition_penalty=1.1 --out bench-out/repetition

Prints one JSON object: the mean strict-prompt score of each run, the paired difference and
its 95% interval, and the share of answers whose last 30 characters repeat earlier text.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from langchain_nudging.config import NudgingConfig, SamplingConfig
from langchain_nudging.evaluation.report.numbers import paired_bootstrap_ci
from langchain_nudging.evaluation.runner import EvalSettings, run_eval
from langchain_nudging.serving.generation import NudgingPair


class _Settings(EvalSettings):
    """The runner's settings with both models' sampling set (the runner sets no sampling)."""

    sampling: SamplingConfig = SamplingConfig()

    def config(self, gamma: float | None) -> NudgingConfig:
        base = super().config(gamma)
        return base.model_copy(
            update={"base_sampling": self.sampling, "nudging_sampling": self.sampling}
        )


def _value(text: str) -> Any:
    return float(text) if "." in text else int(text)


def _looping(answer: str, chars: int = 30) -> bool:
    """The answer's last ``chars`` characters occur earlier in it: it repeats itself."""
    tail = answer.strip()[-chars:]
    return len(tail) == chars and answer.strip()[:-chars].find(tail) != -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--gamma", type=float, default=NudgingConfig().gamma)
    parser.add_argument("--setting", action="append", default=[], help="name=value (repeatable)")
    parser.add_argument("--data", default=os.environ.get("LANGCHAIN_NUDGING_EVAL_DATA"))
    parser.add_argument("--out", default="bench-out/repetition")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    on = SamplingConfig(**{k: _value(v) for k, v in (s.split("=", 1) for s in args.setting)})
    pair = NudgingPair.load()
    started = time.perf_counter()
    settings = {
        label: _Settings(
            tasks=("ifeval",),
            modes=("nudged",),
            gammas=(args.gamma,),
            limit=args.limit,
            max_tokens=args.max_tokens,
            data_dir=args.data,
            concurrency=args.concurrency,
            sampling=sampling,
        )
        for label, sampling in (("off", SamplingConfig()), ("on", on))
    }
    folders = {
        "off": Path(args.out) / "off",
        "on": Path(args.out) / ("-".join(args.setting) or "on"),
    }
    examples = settings["off"].samples()["ifeval"]
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    # A few examples at a time in both runs: a run cut short still leaves complete pairs.
    for start in range(0, len(examples), args.concurrency):
        chunk = {"ifeval": examples[start : start + args.concurrency]}
        for label in ("off", "on"):
            result = run_eval(pair, settings[label], folders[label], progress=False, samples=chunk)
            runs[label].extend(result.records)
    by_id = {label: {r["example_id"]: r for r in records} for label, records in runs.items()}
    ids = sorted(i for i in by_id["off"].keys() & by_id["on"].keys())
    off = [float(by_id["off"][i]["primary"]) for i in ids]
    onn = [float(by_id["on"][i]["primary"]) for i in ids]
    diffs = [b - a for a, b in zip(off, onn, strict=True)]
    low, high = paired_bootstrap_ci(diffs)
    print(
        json.dumps(
            {
                "setting": args.setting,
                "examples": len(ids),
                "max_tokens": args.max_tokens,
                "gamma": args.gamma,
                "score_off": sum(off) / len(ids),
                "score_on": sum(onn) / len(ids),
                "difference": sum(diffs) / len(ids),
                "ci95": [low, high],
                "looping_off": sum(_looping(by_id["off"][i]["answer"]) for i in ids) / len(ids),
                "looping_on": sum(_looping(by_id["on"][i]["answer"]) for i in ids) / len(ids),
                "threads": args.threads,
                "seconds": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
