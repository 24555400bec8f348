"""What one benchmark run measures: wall time, forward passes, and their cost in isolation.

A :class:`PassLog` records every forward pass of a model (how many ids it read, how many were
already cached, how many positions' logits it kept, and how long it took). :func:`replay`
runs the same passes again, one at a time on a cache of the same length, with nothing else
around them: the "required cost" of a run is the sum of those isolated times, the time the
model alone needs for the decisions the run made.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair, Request
from langchain_nudging.backends.base import TextModel, Token
from langchain_nudging.backends.local import LocalModel
from langchain_nudging.reference import ReferenceModel, reference_nudge

Row = dict[str, Any]


DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pair_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every bundled-pair benchmark takes: torch threads, data folder, JSON out."""
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def load_prompts(data_dir: Path, count: int) -> list[str]:
    """The first instructions of just-eval-instruct and GSM8K questions, interleaved."""

    def first(name: str, key: str, n: int) -> list[str]:
        with open(data_dir / name, encoding="utf-8") as lines:
            return [json.loads(line)[key] for line, _ in zip(lines, range(n), strict=False)]

    instructions = first("just_eval_instruct_1000.jsonl", "instruction", count - count // 2)
    questions = first("gsm8k_test.jsonl", "question", count // 2)
    mixed = [p for pair in zip(instructions, questions, strict=False) for p in pair]
    return mixed + instructions[len(questions) :]


def local(model: TextModel) -> LocalModel:
    """The transformers model behind a pair's text model: what these benchmarks time."""
    if not isinstance(model, LocalModel):
        raise TypeError(f"{model.name} is not a transformers model in this process")
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory() -> Row:
    """Peak RSS of the process so far (it only grows), and the CUDA peak since the last call."""
    row: Row = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)}
    if torch.cuda.is_available():
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    return row


@dataclass(frozen=True, slots=True)
class Pass:
    past: int  # ids already in the cache
    new: int  # ids read by this pass
    keep: int | tuple[int, ...]  # logits_to_keep: the last N positions, or these positions
    seconds: float  # wall time inside the model's forward (CPU: exact; CUDA: launch time)


@dataclass
class PassLog:
    """Every forward pass of each named model while :meth:`recording` is active."""

    models: dict[str, torch.nn.Module]
    passes: dict[str, list[Pass]] = field(default_factory=dict)

    @contextmanager
    def recording(self) -> Iterator[dict[str, list[Pass]]]:
        self.passes = {name: [] for name in self.models}
        handles = []
        for name, model in self.models.items():
            started: list[tuple[int, int, Any, float]] = []

            def before(_m: Any, _a: Any, kwargs: dict, started: list = started) -> None:
                ids = kwargs["input_ids"]
                cache = kwargs.get("cache", kwargs.get("past_key_values"))
                past = cache.get_seq_length() if cache is not None else 0
                keep = kwargs.get("logits_to_keep", 0)
                keep = tuple(keep.tolist()) if torch.is_tensor(keep) else int(keep)
                started.append((past, ids.shape[1], keep, time.perf_counter()))

            def after(_m: Any, _a: Any, _k: Any, _o: Any, name: str = name, started=started):
                past, new, keep, start = started.pop()
                self.passes[name].append(Pass(past, new, keep, time.perf_counter() - start))

            handles.append(model.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(model.register_forward_hook(after, with_kwargs=True))
        try:
            yield self.passes
        finally:
            for handle in handles:
                handle.remove()


@torch.inference_mode()
def replay(model: LocalModel, passes: Sequence[Pass]) -> list[float]:
    """Seconds of each pass run alone: same ids read, same cache length, same logits kept.

    The ids are random (cost does not depend on them); the cache is grown or cropped to the
    pass's length outside the timed region.
    """
    device = model.device
    longest = max(p.past + p.new for p in passes)
    generator = torch.Generator().manual_seed(0)
    vocab = model.model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, longest), generator=generator).to(device)
    cache, length, seconds = DynamicCache(), 0, []

    def forward(start: int, end: int, keep: int | tuple[int, ...]) -> None:
        if isinstance(keep, tuple):
            keep = torch.tensor(keep, device=device)  # type: ignore[assignment]
        model.model(
            input_ids=ids[:, start:end],
            **{model.cache_argument: cache},
            use_cache=True,
            logits_to_keep=keep,
        )

    for p in passes:
        if length > p.past:
            cache.crop(p.past - length)
        elif length < p.past:
            forward(length, p.past, 1)
        sync(device)
        start = time.perf_counter()
        forward(p.past, p.past + p.new, p.keep)
        sync(device)
        seconds.append(time.perf_counter() - start)
        length = p.past + p.new
    return seconds


def timed(run: Callable[[], Row], device: torch.device, log: PassLog) -> Row:
    """Run once with every forward pass recorded; wall time, ms per token, passes, memory."""
    with log.recording() as passes:
        sync(device)
        start = time.perf_counter()
        row = run()
        sync(device)
        seconds = time.perf_counter() - start
    tokens = row["tokens"]
    return {
        **row,
        "seconds": round(seconds, 3),
        "ms_per_token": round(1e3 * seconds / tokens, 2) if tokens else None,
        "forward_passes": {name: len(p) for name, p in passes.items() if p},
        "forward_seconds": {
            name: round(sum(x.seconds for x in p), 3) for name, p in passes.items() if p
        },
        # Passes over an empty cache: prompt (+ answer) read from the start.
        "from_scratch_seconds": round(
            sum(x.seconds for p in passes.values() for x in p if x.past == 0), 3
        ),
        "passes": {name: list(p) for name, p in passes.items() if p},
        **memory(),
    }


@torch.inference_mode()
def base_alone(pair: NudgingPair, messages: list[ChatMessage], max_tokens: int) -> Row:
    """The floor: transformers ``generate`` on the engine's own base prompt, exactly N tokens."""
    prompt = pair.generate(Request(messages)).prompts.base
    base = local(pair.base)
    model, text = base.model, base.text
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
    return {"tokens": out.shape[1] - ids.shape[1]}


class OneByOne:
    """A session that verifies draft boundaries one forward pass at a time (the ablation)."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        for answer in answers:
            yield self.session.peek(answer)


def engine(
    pair: NudgingPair,
    messages: list[ChatMessage],
    config: NudgingConfig,
    *,
    one_by_one: bool = False,
) -> Row:
    """The nudged answer through the cached sessions, as the engine runs a request alone."""
    opened = pair.base.session
    if one_by_one:
        pair.base.session = lambda *args, **kwargs: OneByOne(  # type: ignore[method-assign]
            opened(*args, **kwargs)
        )
    try:
        generation = pair.generate(Request(messages, config))
        for _ in generation:
            pass
    finally:
        if one_by_one:
            del pair.base.session  # back to the class's method
    stats = generation.stats
    return {
        "tokens": stats.base_tokens + stats.nudge_tokens,
        "nudged_share": round(stats.nudged_share, 3),
        "rounds": stats.rounds,
        "finish": stats.finish_reason,
        "choices_reused": stats.choices_reused,
        "text": generation.text,
    }


def oracle(
    pair: NudgingPair,
    refs: tuple[ReferenceModel, ReferenceModel],
    messages: list[ChatMessage],
    config: NudgingConfig,
) -> Row:
    """The uncached oracle on the engine's own prompts and stop strings."""
    generation = pair.generate(Request(messages, config))
    prompts = generation.prompts
    run = reference_nudge(
        *refs, prompts.base, prompts.nudging, generation.config, generation.markers
    )
    return {
        "tokens": len(pair.base.token_ids(run.text)),
        "rounds": run.rounds,
        "finish": run.finish_reason,
        "text": run.text,
    }


def required_cost(pair: NudgingPair, row: Row) -> Row:
    """Replay a run's passes in isolation: the required cost and what it says of the run."""
    models = {"base": local(pair.base), "nudging": local(pair.nudging)}
    cost: Row = {}
    for name, passes in row["passes"].items():
        seconds = replay(models[name], passes)
        steps = [s for s, p in zip(seconds, passes, strict=True) if p.new == 1]
        cost[name] = {
            "seconds": sum(seconds),
            "step_ms": 1e3 * sum(steps) / len(steps) if steps else None,
        }
    required = sum(c["seconds"] for c in cost.values())
    return {
        "required_s": round(required, 3),
        "efficiency": round(row["seconds"] / required, 3),
        "required_by_model": {
            name: {k: v and round(v, 3) for k, v in c.items()} for name, c in cost.items()
        },
    }
