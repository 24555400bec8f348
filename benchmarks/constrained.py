"""What grammar constraints cost, and that unconstrained requests pay nothing for them.

    python -m benchmarks.constrained [--prompts 4] [--max-tokens 96] [--threads 2] [--json PATH]

One process, the bundled pair, nudged answers to the same prompts under:

* ``none``: no output spec, as every request without tools or a response format;
* ``any text``: a grammar that allows every text, so the answer is the same as ``none`` but
  every choice of both models goes through a matcher and a mask: the price of the machinery;
* ``json schema``: an answer constrained to a small JSON schema (with_structured_output);
* ``tool call``: a forced call of one of two tools (bind_tools(..., tool_choice="any")).

For each: ms per answer token, masks per token, the share of wall time spent computing masks
and whether the text equals the unconstrained one (``any text``). The matcher's tokenizer is
built once per model before timing (reported apart). docs/tools.md shows a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import cached_property
from typing import Any

import llguidance
import torch
from rich.console import Console
from rich.table import Table

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair, Request
from langchain_nudging.backends import grammar as grammar_module
from langchain_nudging.structured import OutputSpec, ToolSpec

from .measure import load_prompts, pair_run_options

SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["summary", "confidence", "tags"],
}
TOOLS = (
    ToolSpec(
        "search",
        "Search the web.",
        {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    ),
    ToolSpec(
        "calculator",
        "Evaluate an arithmetic expression.",
        {
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
        },
    ),
)


class AnyText(OutputSpec):
    """Every text is allowed: the same answer as no spec, through matchers and masks."""

    @cached_property
    def grammar(self) -> str | None:
        return llguidance.LLMatcher.grammar_from_lark("start: /[\\s\\S]*/\n")


SPECS: dict[str, OutputSpec] = {
    "none": OutputSpec(),
    "any text": AnyText(),
    "json schema": OutputSpec(schema=SCHEMA, max_string_length=120),
    "tool call": OutputSpec(TOOLS, "required", max_string_length=120),
}


class MaskClock:
    """Seconds spent in ``AnswerMatcher.allowed`` (matcher sync + mask), by wrapping it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._allowed = grammar_module.AnswerMatcher.allowed
        clock = self

        def timed(matcher: Any, ids: list[int]) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return clock._allowed(matcher, ids)
            finally:
                clock.seconds += time.perf_counter() - start

        grammar_module.AnswerMatcher.allowed = timed  # type: ignore[method-assign]

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def run(
    pair: NudgingPair, prompt: str, spec: OutputSpec, max_tokens: int, clock: MaskClock
) -> dict[str, Any]:
    clock.take()
    request = Request(
        [ChatMessage("user", prompt)], NudgingConfig(max_tokens=max_tokens), output=spec
    )
    generation = pair.generate(request)
    start = time.perf_counter()
    list(generation)
    wall = time.perf_counter() - start
    stats = generation.stats
    tokens = max(1, stats.base_tokens + stats.nudge_tokens)
    masks = sum(stats.grammar_masks.values())
    valid = None
    if spec.constrained:
        try:
            spec.parse(generation.text)
            valid = True
        except ValueError:
            valid = False
    return {
        "text": generation.text,
        "finish_reason": stats.finish_reason,
        "tokens": tokens,
        "ms_per_token": 1000 * wall / tokens,
        "masks_per_token": masks / tokens,
        "mask_share": clock.take() / wall,
        "complete": valid,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.constrained")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=96)
    pair_run_options(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = NudgingPair.load(dtype="float32", device="cpu")
    build = {}
    for name, model in (("base", pair.base), ("nudging", pair.nudging)):
        start = time.perf_counter()
        model.prepare(grammars=True)
        build[name] = round(time.perf_counter() - start, 2)
    clock = MaskClock()
    prompts = load_prompts(args.data, args.prompts)
    run(pair, "Hi", SPECS["none"], 4, clock)  # warm-up
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in SPECS}
    for prompt in prompts:
        for name, spec in SPECS.items():
            results[name].append(run(pair, prompt, spec, args.max_tokens, clock))
    same = [
        a["text"] == b["text"] for a, b in zip(results["none"], results["any text"], strict=True)
    ]
    summary: dict[str, Any] = {
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "prompts": len(prompts),
        "matcher_tokenizer_build_s": build,
        "any_text_equals_none": f"{sum(same)}/{len(same)}",
        "runs": {},
    }
    none_ms = statistics.median(r["ms_per_token"] for r in results["none"])
    table = Table(title=f"Grammar cost, nudged, {len(prompts)} prompts, medians")
    for column in ("spec", "ms/token", "vs none", "masks/token", "mask share", "complete"):
        table.add_column(column)
    for name, rows in results.items():
        ms = statistics.median(r["ms_per_token"] for r in rows)
        entry = {
            "ms_per_token": round(ms, 1),
            "vs_none": round(ms / none_ms, 3),
            "masks_per_token": round(statistics.median(r["masks_per_token"] for r in rows), 2),
            "mask_share": round(statistics.median(r["mask_share"] for r in rows), 4),
            "complete": f"{sum(bool(r['complete']) for r in rows)}/{len(rows)}"
            if SPECS[name].constrained
            else "-",
        }
        summary["runs"][name] = entry
        table.add_row(
            name,
            str(entry["ms_per_token"]),
            str(entry["vs_none"]),
            str(entry["masks_per_token"]),
            f"{100 * entry['mask_share']:.2f}%",
            entry["complete"],
        )
    console = Console()
    console.print(table)
    console.print(
        f"matcher tokenizer built once per model (s): {build}; "
        f"'any text' answers equal to unconstrained: {summary['any_text_equals_none']}"
    )
    if args.json:
        args.json.write_text(json.dumps({**summary, "detail": results}, indent=2))
    return summary


if __name__ == "__main__":
    main()
