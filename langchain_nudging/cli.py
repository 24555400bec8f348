"""The ``nudging`` command: ask the nudged pair a question and watch who writes what."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .algorithm import Mode, Segment
from .config import NudgingConfig, SamplingConfig
from .serving.engine import Failed, NudgingEngine, RequestHandle
from .evaluation.scoring import ScoringSetupError
from .evaluation.tasks import DATA_ENV_VAR, TASKS
from .serving.generation import GenerationStats, NudgingPair
from .models import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    ModelLoadError,
    check_source,
    resolve_device,
    resolve_dtype,
)
from .prompts import ChatMessage

DEFAULT_QUESTION = "Give me three tips for staying healthy."
NUDGE_STYLE = "bold yellow"
OPEN_MARK, CLOSE_MARK = "⟦", "⟧"  # marks nudged text where colour is not available


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nudging",
        description="A base model writes; a small aligned model nudges where it is unsure.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="answer one question with the nudged pair")
    chat.add_argument(
        "question",
        nargs="?",
        default=None,
        help="the question; without one, an interactive chat on a terminal, else a default",
    )
    add_model_options(chat)
    nudging = chat.add_argument_group("nudging")
    defaults = NudgingConfig()
    nudging.add_argument("--gamma", type=float, default=defaults.gamma)
    nudging.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    nudging.add_argument("--draft-tokens", type=int, default=defaults.draft_tokens)
    nudging.add_argument("--chunk-tokens", type=int, default=defaults.chunk_tokens)
    nudging.add_argument("--system", default=None, help="system prompt for both models")
    nudging.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    nudging.add_argument("--temperature", type=float, default=0.0, help="both models; 0 = greedy")
    nudging.add_argument("--top-p", type=float, default=1.0)
    nudging.add_argument("--top-k", type=int, default=0)
    nudging.add_argument("--seed", type=int, default=None)
    output = chat.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object at the end")
    output.add_argument(
        "--compare",
        action="store_true",
        help="run the base model alone, the nudging model alone and the nudged pair side by side",
    )
    commands.add_parser(
        "bench",
        add_help=False,
        help="measure the engine against the base model alone and the oracle "
        "(benchmarks/throughput.py of a source checkout; `nudging bench --help` for options)",
    )
    output.add_argument(
        "--marks",
        choices=["auto", "color", "brackets", "none"],
        default="auto",
        help=f"how nudged text is shown (auto: colour on a tty, else {OPEN_MARK}..{CLOSE_MARK})",
    )
    add_eval_parser(commands)
    return parser


def add_model_options(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument("--base", default=BUNDLED_BASE_ID, help="base model: id, folder or .gguf")
    models.add_argument(
        "--nudging", default=BUNDLED_NUDGING_ID, help="nudging model: id, folder or .gguf"
    )
    models.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    models.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    models.add_argument("--device-map", default=None, help="accelerate device_map, e.g. auto")
    models.add_argument("--trust-remote-code", action="store_true")
    models.add_argument("--cache-dir", default=None, help="where converted GGUF models live")


def _listed(kind: Callable[[str], object]) -> Callable[[str], list[object]]:
    """An option value that may hold several comma-separated items."""

    def parse(text: str) -> list[object]:
        return [kind(item) for item in text.split(",") if item.strip()]

    return parse


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score the base model alone, the nudging model alone and the nudged pair on tasks",
        description="Answer each task's examples in each mode, score them offline and write a "
        "report (report.md, scores.png, answers.html) into --out. Results are saved per "
        "example as they come, so rerunning the same command resumes an interrupted run.",
    )
    evaluate.add_argument(
        "--task",
        nargs="+",
        type=_listed(str),
        required=True,
        help=f"one or more of: {', '.join(TASKS)}",
    )
    evaluate.add_argument(
        "--modes",
        type=_listed(str),
        default=["base", "nudging", "nudged"],
        help="comma-separated, of base, nudging, nudged (default: all three)",
    )
    evaluate.add_argument("--limit", type=int, default=None, help="examples per task (a sample)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    evaluate.add_argument(
        "--gamma",
        nargs="+",
        type=_listed(float),
        default=[[NudgingConfig().gamma]],
        help="the nudged pair's gamma; several values run a sweep",
    )
    evaluate.add_argument("--max-tokens", type=int, default=NudgingConfig().max_tokens)
    evaluate.add_argument("--draft-tokens", type=int, default=NudgingConfig().draft_tokens)
    evaluate.add_argument("--chunk-tokens", type=int, default=NudgingConfig().chunk_tokens)
    evaluate.add_argument(
        "--concurrency", type=int, default=4, help="answers in flight at once (default 4)"
    )
    evaluate.add_argument(
        "--data",
        default=os.environ.get(DATA_ENV_VAR),
        help=f"folder of task files (default: ${DATA_ENV_VAR}; without one, the Hugging Face "
        "hub through the `datasets` package)",
    )
    evaluate.add_argument("--out", default="nudging-eval", help="output folder (%(default)s)")
    evaluate.add_argument(
        "--report",
        default=None,
        help="folder for the report files (default: --out); e.g. a sweep's own report over "
        "the answers in --out",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(evaluate)


MAX_SEED = 2**64 - 1  # what a torch generator takes
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def config_from_args(args: argparse.Namespace) -> NudgingConfig:
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed {args.seed}: must be in [0, 2**64 - 1]")
    sampling = SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    return NudgingConfig(
        gamma=args.gamma,
        max_tokens=args.max_tokens,
        draft_tokens=args.draft_tokens,
        chunk_tokens=args.chunk_tokens,
        stop=tuple(args.stop),
        base_sampling=sampling,
        nudging_sampling=sampling,
    )


def check_model_args(args: argparse.Namespace) -> None:
    """Validate the model options before anything loads: a bad --nudging fails before the base
    model has loaded, a mistyped path or an unreachable Hub id at once."""
    checks: list[tuple[str, Callable[[], object]]] = [
        ("--device", lambda: args.device is None or resolve_device(args.device)),
        ("--dtype", lambda: resolve_dtype(args.dtype, args.device)),
    ]
    for flag, check in checks:
        try:
            check()
        except ModelLoadError as exc:
            raise ModelLoadError(f"{flag}: {exc}") from None
    device_map = args.device_map
    if device_map is not None and device_map not in DEVICE_MAPS:
        try:
            resolve_device(device_map)
        except ModelLoadError:
            raise ModelLoadError(
                f"--device-map {device_map!r}: expected one of {', '.join(DEVICE_MAPS)} or a "
                "torch device (cpu, cuda, cuda:1, ...)"
            ) from None
    for flag, source in (("--base", args.base), ("--nudging", args.nudging)):
        try:
            check_source(source)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{flag}: {exc}") from None


def load_pair(args: argparse.Namespace) -> NudgingPair:
    check_model_args(args)
    options = {
        "dtype": args.dtype,
        "device": args.device,
        "device_map": args.device_map,
        "trust_remote_code": args.trust_remote_code,
        "cache_dir": args.cache_dir,
    }
    return NudgingPair.load(args.base, args.nudging, **options)


def summary(stats: GenerationStats) -> str:
    total = stats.base_tokens + stats.nudge_tokens
    speed = total / stats.wall_time if stats.wall_time else 0.0
    return (
        f"{total} tokens · {stats.nudged_share:.0%} nudged ({stats.nudge_tokens} tokens, "
        f"{stats.nudge_words} words) · {stats.rounds} rounds · {stats.wall_time:.1f} s · "
        f"{speed:.1f} tokens/s · finish: {stats.finish_reason}"
    )


def styled(segment: Segment, marks: str) -> Text:
    if segment.source == "nudge" and marks == "color":
        return Text(segment.text, style=NUDGE_STYLE)
    if segment.source == "nudge" and marks == "brackets":
        return Text(OPEN_MARK + segment.text + CLOSE_MARK)
    return Text(segment.text)


def as_json(handle: RequestHandle) -> dict[str, object]:
    generation = handle.generation
    return {
        "text": generation.text,
        "segments": [
            {"text": s.text, "source": s.source, "base_top1_prob": s.base_top1_prob}
            for s in generation.segments
        ],
        "stats": generation.stats.as_dict(),
    }


def stream(handle: RequestHandle, console: Console, errors: Console, marks: str) -> bool:
    """Print one answer as it is produced; Ctrl-C cancels it. Returns whether it finished."""
    try:
        for segment in handle.segments():
            console.print(styled(segment, marks), end="")
    except KeyboardInterrupt:
        handle.cancel()
        console.print()
        errors.print(Text("[answer cancelled]", style="dim"))
        return False
    console.print()
    errors.print(Text(summary(handle.generation.stats), style="dim"))
    return True


MODES: dict[Mode, str] = {
    "base": "base model alone",
    "nudging": "nudging model alone",
    "nudged": "nudged",
}


def compare_table(handles: dict[Mode, RequestHandle], marks: str) -> Table:
    table = Table(expand=True, show_lines=True)
    for mode in handles:
        table.add_column(MODES[mode], ratio=1)
    texts = [Text() for _ in handles]
    for text, handle in zip(texts, handles.values(), strict=True):
        for segment in list(handle.generation.segments):
            text.append_text(styled(segment, marks))
    table.add_row(*texts)
    table.add_row(
        *(
            Text(summary(h.generation.stats) if h.done else "...", style="dim")
            for h in handles.values()
        )
    )
    return table


async def _drain(handle: RequestHandle) -> None:
    async for event in handle:
        if isinstance(event, Failed):
            raise event.error


def run_compare(
    engine: NudgingEngine,
    messages: list[ChatMessage],
    config: NudgingConfig,
    console: Console,
    marks: str,
) -> dict[Mode, RequestHandle]:
    """The three modes at once on the engine's worker, shown side by side."""
    handles = {mode: engine.submit(messages, config, mode) for mode in MODES}

    async def run_all() -> None:
        tasks = [asyncio.ensure_future(_drain(h)) for h in handles.values()]
        if not console.is_terminal:
            await asyncio.gather(*tasks)
            return
        with Live(compare_table(handles, marks), console=console, auto_refresh=False) as live:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.2)
                live.update(compare_table(handles, marks), refresh=True)
        await asyncio.gather(*tasks)

    try:
        asyncio.run(run_all())
    finally:
        for handle in handles.values():
            handle.cancel()
    if not console.is_terminal:
        console.print(compare_table(handles, marks))
    return handles


def interactive(
    engine: NudgingEngine,
    system: str | None,
    config: NudgingConfig,
    console: Console,
    errors: Console,
    marks: str,
) -> int:
    """A multi-turn chat; Ctrl-C cancels the answer in progress, Ctrl-D or /exit leaves."""
    errors.print(
        Text("Multi-turn chat: /history shows it, /reset forgets it, Ctrl-D leaves.", "dim")
    )
    history: list[ChatMessage] = [ChatMessage("system", system)] if system else []
    while True:
        try:
            line = console.input("[bold]you>[/bold] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            return 0
        if question == "/reset":
            history = history[:1] if system else []
            continue
        if question == "/history":
            for message in history:
                console.print(Text(f"{message.role}: {message.content}"))
            continue
        messages = [*history, ChatMessage("user", question)]
        handle = engine.submit(messages, config)
        if stream(handle, console, errors, marks):
            history = [*messages, ChatMessage("assistant", handle.generation.text)]


def run_chat(args: argparse.Namespace, console: Console, errors: Console) -> int:
    config = config_from_args(args)
    marks = args.marks
    if marks == "auto":
        marks = "color" if console.is_terminal else "brackets"
    chatting = args.question is None and sys.stdin.isatty() and not args.json
    messages = [ChatMessage("user", args.question or DEFAULT_QUESTION)]
    if args.system is not None:
        messages.insert(0, ChatMessage("system", args.system))
    pair = load_pair(args)
    engine = NudgingEngine(pair)
    try:
        if chatting:
            return interactive(engine, args.system, config, console, errors, marks)
        if args.compare:
            handles = run_compare(engine, messages, config, console, marks)
            if args.json:
                print(json.dumps({m: as_json(h) for m, h in handles.items()}, ensure_ascii=False))
            return 0
        handle = engine.submit(messages, config)
        if args.json:
            handle.result()
            payload = {
                **as_json(handle),
                "models": {"base": pair.base.name, "nudging": pair.nudging.name},
                "config": config.model_dump(mode="json"),
            }
            print(json.dumps(payload, ensure_ascii=False))
            return 0
        return 0 if stream(handle, console, errors, marks) else 130
    finally:
        engine.shutdown()


def run_eval_command(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from .evaluation.report import main_table, write_report
    from .evaluation.runner import EvalSettings, run_eval, run_identity

    settings = EvalSettings(
        tasks=[name for group in args.task for name in group],
        modes=args.modes,
        gammas=[gamma for group in args.gamma for gamma in group],
        limit=args.limit,
        seed=args.seed,
        max_tokens=args.max_tokens,
        draft_tokens=args.draft_tokens,
        chunk_tokens=args.chunk_tokens,
        concurrency=args.concurrency,
        data_dir=args.data,
    )
    samples = settings.samples()  # bad data fails before the models load
    pair = load_pair(args)
    result = run_eval(pair, settings, args.out, progress=not args.no_progress, samples=samples)
    run = {**run_identity(pair, settings), "seed": settings.seed, "limit": settings.limit}
    paths = write_report(result.records, Path(args.report or args.out), run=run)
    console.print(main_table(json.loads(paths["json"].read_text(encoding="utf-8"))))
    for kind, path in paths.items():
        errors.print(Text(f"{kind}: {path}", style="dim"))
    for failure in result.failures:
        errors.print(f"nudging: failed (rerun to retry): {failure}")
    return 1 if result.failures else 0


def run_bench(options: list[str], errors: Console) -> int:
    """Run benchmarks/throughput.py: it lives beside the package in a source checkout."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "benchmarks" / "throughput.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        throughput = importlib.import_module("benchmarks.throughput")
    except ModuleNotFoundError as exc:
        if exc.name not in ("benchmarks", "benchmarks.throughput"):
            raise
        errors.print(
            "nudging: bench runs benchmarks/throughput.py from a source checkout of "
            "langchain-nudging (pip install -e <checkout>); it is not part of the installed package"
        )
        return 2
    throughput.main(options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.command == "bench":
            return run_bench(rest, errors)
        if args.command == "eval":
            return run_eval_command(args, console, errors)
        return run_chat(args, console, errors)
    except ValidationError as exc:
        errors.print(f"nudging: invalid option: {_validation_message(exc)}")
    except (ModelLoadError, ValueError, ScoringSetupError) as exc:
        errors.print(f"nudging: {exc}")
    except KeyboardInterrupt:
        errors.print("nudging: interrupted")
        return 130
    return 2


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )


if __name__ == "__main__":
    sys.exit(main())
