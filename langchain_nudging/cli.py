"""The ``nudging`` command: ask the nudged pair a question and watch who writes what."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .algorithm import Segment
from .backends.http import API_KEY_ENV, DEFAULT_RETRIES, DEFAULT_TIMEOUT, ServerError
from .backends.registry import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID, check_spec, runtimes
from .config import ALGORITHM_KNOBS, SAMPLING_KNOBS, NudgingConfig, SamplingConfig
from .evaluation.runner import EvalSettings, run_eval, run_identity
from .evaluation.scoring import ScoringSetupError
from .evaluation.tasks import DATA_ENV_VAR, TASKS
from .models import ModelLoadError, resolve_device, resolve_dtype
from .models.gguf import _transformers_bars
from .prompts import ChatMessage
from .request import Mode, Request
from .serving.engine import NudgingEngine
from .serving.events import Failed, Finished, SegmentEvent
from .serving.generation import GenerationStats, NudgingPair
from .serving.handle import RequestHandle

DEFAULT_QUESTION = "Give me three tips for staying healthy."
NUDGE_STYLE = "bold yellow"
OPEN_MARK, CLOSE_MARK = "⟦", "⟧"  # marks nudged text where colour is not available
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

#: The knobs an evaluation sets, as its settings declare them (gamma is its sweep, --gamma).
EVAL_KNOBS: dict[str, FieldInfo] = {
    name: EvalSettings.model_fields[name]
    for name in ALGORITHM_KNOBS
    if name != "gamma" and name in EvalSettings.model_fields
}
#: The chat command's knobs, each declared once in the configs (both models' sampling).
CHAT_KNOBS: dict[str, FieldInfo] = {
    **{name: NudgingConfig.model_fields[name] for name in ALGORITHM_KNOBS},
    **{name: SamplingConfig.model_fields[name] for name in SAMPLING_KNOBS},
}


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
        help="the question; without one, the question is read from standard input when that is "
        "not a terminal (a pipe or a file), else an interactive chat starts (with --json: "
        f"{DEFAULT_QUESTION!r})",
    )
    add_model_options(chat)
    nudging = chat.add_argument_group("nudging")
    add_knob_options(nudging, CHAT_KNOBS)
    nudging.add_argument("--system", default=None, help="system prompt for both models")
    nudging.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    output = chat.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print one JSON object at the end")
    output.add_argument(
        "--compare",
        action="store_true",
        help="run the base model alone, the nudging model alone and the nudged pair side by side",
    )
    output.add_argument(
        "--marks",
        choices=["auto", "color", "brackets", "none"],
        default="auto",
        help=f"how nudged text is shown (auto: colour on a tty, else {OPEN_MARK}..{CLOSE_MARK})",
    )
    add_eval_parser(commands)
    return parser


def flag(name: str) -> str:
    """A knob's flag: ``max_tokens`` -> ``--max-tokens``."""
    return "--" + name.replace("_", "-")


def add_knob_options(group: argparse._ArgumentGroup, knobs: dict[str, FieldInfo]) -> None:
    """One flag per knob; its type, default and help come from the knob's declaration (the
    range is checked where the config is built, naming the flag)."""
    for name, info in knobs.items():
        description = (info.description or "").replace("%", "%%")
        bounds = value_range(info)
        stated = bounds is None or re.search(r"\bin [\[(]|>=|must be", description)
        group.add_argument(
            flag(name),
            dest=name,
            type=_value_type(info),
            default=info.default,
            help=f"{description} ({'' if stated else f'{bounds}; '}default: "
            f"{'%(default)s' if info.default is not None else 'none'})",
        )


def value_range(info: FieldInfo) -> str | None:
    """A field's range as its constraints declare it: ``in [0, 1]``, ``>= 1``, ... or ``None``."""
    low = high = None
    for item in info.metadata:
        for bracket, attribute in (("[", "ge"), ("(", "gt")):
            if getattr(item, attribute, None) is not None:
                low = (bracket, getattr(item, attribute))
        for bracket, attribute in (("]", "le"), (")", "lt")):
            if getattr(item, attribute, None) is not None:
                high = (bracket, getattr(item, attribute))
    if low and high:
        top = "2**64 - 1" if high[1] == 2**64 - 1 else f"{high[1]:g}"
        return f"in {low[0]}{low[1]:g}, {top}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]:g}"
    return None


def _value_type(info: FieldInfo) -> Callable[[str], Any]:
    """What a knob's flag value is read as: its type, ``int`` for an ``int | None`` knob."""
    (kind,) = (k for k in get_args(info.annotation) or (info.annotation,) if k is not type(None))
    return kind


def add_model_options(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument(
        "--base",
        default=BUNDLED_BASE_ID,
        help="base model: id, folder, .gguf or server URL (http://host:port, llamacpp+http://...)",
    )
    models.add_argument(
        "--nudging",
        default=BUNDLED_NUDGING_ID,
        help="nudging model: id, folder, .gguf or server URL",
    )
    models.add_argument(
        "--runtime",
        choices=runtimes(),
        default="transformers",
        help="where bundled and .gguf models run: in this process (transformers), or on "
        "llama.cpp servers started on loopback (llamacpp)",
    )
    models.add_argument(
        "--api-key", default=None, help=f"servers' API key (default: ${API_KEY_ENV})"
    )
    models.add_argument(
        "--server-timeout",
        type=float,
        default=None,
        help=f"seconds a call to a server may wait, > 0 (default: {DEFAULT_TIMEOUT:g})",
    )
    models.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help=f"retries of a failed server call, with backoff, >= 0 (default: {DEFAULT_RETRIES})",
    )
    models.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    models.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    models.add_argument("--device-map", default=None, help="accelerate device_map, e.g. auto")
    models.add_argument("--trust-remote-code", action="store_true")
    models.add_argument("--cache-dir", default=None, help="where converted GGUF models live")
    models.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own progress bars while models load (hidden by default)",
    )


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
    settings = EvalSettings.model_fields
    evaluate.add_argument(
        "--limit",
        type=int,
        default=None,
        help=f"examples per task, a sample, {value_range(settings['limit'])} (default: all)",
    )
    evaluate.add_argument(
        "--seed",
        type=int,
        default=settings["seed"].default,
        help=f"seed of the sample, {value_range(settings['seed'])} (default: %(default)s)",
    )
    gamma = NudgingConfig.model_fields["gamma"]
    evaluate.add_argument(
        "--gamma",
        nargs="+",
        type=_listed(float),
        default=[[gamma.default]],
        help=f"the nudged pair's gamma, {value_range(gamma)}; several values (space- or "
        f"comma-separated) run a sweep (default: {gamma.default})",
    )
    add_knob_options(evaluate.add_argument_group("nudging"), EVAL_KNOBS)
    evaluate.add_argument(
        "--concurrency",
        type=int,
        default=settings["concurrency"].default,
        help=f"answers in flight at once, {value_range(settings['concurrency'])} "
        "(default: %(default)s)",
    )
    evaluate.add_argument(
        "--data",
        default=os.environ.get(DATA_ENV_VAR),
        help=f"folder of task files (default: ${DATA_ENV_VAR}; without one, the Hugging Face "
        "hub through the `datasets` package)",
    )
    evaluate.add_argument(
        "--out", default="nudging-eval", help="output folder (default: %(default)s)"
    )
    evaluate.add_argument(
        "--report",
        default=None,
        help="folder for the report files (default: --out); e.g. a sweep's own report over "
        "the answers in --out",
    )
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_options(evaluate)


def config_from_args(args: argparse.Namespace) -> NudgingConfig:
    """The chat command's config: its knob flags, the same sampling for both models."""
    sampling = SamplingConfig(**{name: getattr(args, name) for name in SAMPLING_KNOBS})
    return NudgingConfig(
        **{name: getattr(args, name) for name in ALGORITHM_KNOBS},
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
    for option, check in checks:
        try:
            check()
        except ModelLoadError as exc:
            raise ModelLoadError(f"{option}: {exc}") from None
    device_map = args.device_map
    if device_map is not None and device_map not in DEVICE_MAPS:
        try:
            resolve_device(device_map)
        except ModelLoadError:
            raise ModelLoadError(
                f"--device-map {device_map!r}: expected one of {', '.join(DEVICE_MAPS)} or a "
                "torch device (cpu, cuda, cuda:1, ...)"
            ) from None
    check_spec(args.base, "--base", deep=True)
    check_spec(args.nudging, "--nudging", deep=True)


def load_pair(args: argparse.Namespace) -> NudgingPair:
    check_model_args(args)
    options = {
        "dtype": args.dtype,
        "device": args.device,
        "device_map": args.device_map,
        "trust_remote_code": args.trust_remote_code,
        "cache_dir": args.cache_dir,
        "runtime": args.runtime,
    }
    server = {
        "api_key": args.api_key,
        "timeout": args.server_timeout,
        "max_retries": args.max_retries,
    }
    options.update({name: value for name, value in server.items() if value is not None})
    return NudgingPair.load(args.base, args.nudging, **options)


def plural(count: int, noun: str) -> str:
    """``1 word``, ``2 words``, ``0 words``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def summary(stats: GenerationStats) -> str:
    total = stats.base_tokens + stats.nudge_tokens
    speed = total / stats.wall_time if stats.wall_time else 0.0
    return (
        f"{plural(total, 'token')} · {stats.nudged_share:.0%} nudged "
        f"({plural(stats.nudge_tokens, 'token')}, {plural(stats.nudge_words, 'word')}) · "
        f"{plural(stats.rounds, 'round')} · {stats.wall_time:.1f} s · "
        f"{speed:.1f} tokens/s · finish: {stats.finish_reason}"
    )


def styled(segment: Segment, marks: str) -> Text:
    if segment.source == "nudge" and marks == "color":
        return Text(segment.text, style=NUDGE_STYLE)
    if segment.source == "nudge" and marks == "brackets":
        return Text(OPEN_MARK + segment.text + CLOSE_MARK)
    return Text(segment.text)


def as_json(finished: Finished) -> dict[str, object]:
    return {
        "text": finished.text,
        "segments": [
            {"text": s.text, "source": s.source, "base_top1_prob": s.base_top1_prob}
            for s in finished.segments
        ],
        "stats": finished.stats.as_dict(),
    }


CANCELLED = "[answer cancelled]"


def stream(
    handle: RequestHandle, console: Console, errors: Console, marks: str, cancelled: str = ""
) -> Shown:
    """Print one answer as it is produced; Ctrl-C cancels it. Returns what was shown: its
    ``finished`` is ``None`` when it was cancelled (then ``cancelled`` follows the notice)."""
    shown = Shown()
    try:
        for event in handle:
            if isinstance(event, SegmentEvent):
                shown.segments.append(event.segment)
                console.print(styled(event.segment, marks), end="")
            elif isinstance(event, Failed):
                raise event.error
            else:
                shown.finished = event
    except KeyboardInterrupt:
        handle.cancel()
        console.print()
        errors.print(Text(CANCELLED + cancelled, style="dim"))
        return shown
    assert shown.finished is not None  # the events end with Finished or Failed
    console.print()
    errors.print(Text(summary(shown.finished.stats), style="dim"))
    return shown


MODES: dict[Mode, str] = {
    "base": "base model alone",
    "nudging": "nudging model alone",
    "nudged": "nudged",
}


@dataclass
class Shown:
    """What one request's events have shown so far."""

    segments: list[Segment] = field(default_factory=list)
    finished: Finished | None = None

    @property
    def text(self) -> str:
        return "".join(segment.text for segment in self.segments)

    async def read(self, handle: RequestHandle) -> None:
        async for event in handle:
            if isinstance(event, SegmentEvent):
                self.segments.append(event.segment)
            elif isinstance(event, Failed):
                raise event.error
            else:
                self.finished = event


def compare_table(shown: dict[Mode, Shown], marks: str) -> Table:
    table = Table(expand=True, show_lines=True)
    for mode in shown:
        table.add_column(MODES[mode], ratio=1)
    texts = [Text() for _ in shown]
    for text, answer in zip(texts, shown.values(), strict=True):
        for segment in answer.segments:
            text.append_text(styled(segment, marks))
    table.add_row(*texts)
    table.add_row(
        *(
            Text(summary(a.finished.stats) if a.finished else "...", style="dim")
            for a in shown.values()
        )
    )
    return table


def run_compare(
    engine: NudgingEngine,
    messages: list[ChatMessage],
    config: NudgingConfig,
    console: Console,
    marks: str,
) -> dict[Mode, Finished]:
    """The three modes at once on the engine, shown side by side."""
    handles = {mode: engine.submit(Request(messages, config, mode)) for mode in MODES}
    shown = {mode: Shown() for mode in MODES}

    async def run_all() -> None:
        tasks = [asyncio.ensure_future(shown[m].read(h)) for m, h in handles.items()]
        if not console.is_terminal:
            await asyncio.gather(*tasks)
            return
        with Live(compare_table(shown, marks), console=console, auto_refresh=False) as live:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.2)
                live.update(compare_table(shown, marks), refresh=True)
        await asyncio.gather(*tasks)

    try:
        asyncio.run(run_all())
    finally:
        for handle in handles.values():
            handle.cancel()
    if not console.is_terminal:
        console.print(compare_table(shown, marks))
    return {mode: answer.finished for mode, answer in shown.items() if answer.finished}


#: The interactive chat's commands and what each does.
COMMANDS = {
    "/help": "list these commands",
    "/history": "show the conversation, cancelled answers marked",
    "/reset": "forget the conversation (a --system prompt stays)",
    "/exit": "leave (also /quit or Ctrl-D)",
}
COMMAND_WORD = re.compile(r"/[A-Za-z][\w-]*")  # `/usr/bin ...` is a question, `/hepl` a typo
CHAT_HINT = "Ctrl-C cancels an answer, Ctrl-D or /exit leaves, /help lists the commands."


@dataclass
class Turn:
    """One question and its answer; a cancelled answer is kept to show, never sent again."""

    question: str
    answer: str
    cancelled: bool = False


def conversation(system: str | None, turns: list[Turn]) -> list[ChatMessage]:
    """The messages the models read: the system prompt and every answered turn."""
    messages = [ChatMessage("system", system)] if system else []
    for turn in turns:
        if not turn.cancelled:
            messages += [ChatMessage("user", turn.question), ChatMessage("assistant", turn.answer)]
    return messages


def interactive(
    engine: NudgingEngine,
    system: str | None,
    config: NudgingConfig,
    console: Console,
    errors: Console,
    marks: str,
) -> int:
    """A multi-turn chat; Ctrl-C cancels the answer in progress (or, at the prompt, only
    clears the line), Ctrl-D or /exit leaves."""
    dim = "dim"
    errors.print(Text(f"Multi-turn chat. {CHAT_HINT}", dim))
    turns: list[Turn] = []
    while True:
        try:
            line = console.input("[bold]you>[/bold] ")
        except EOFError:
            console.print()
            return 0
        except KeyboardInterrupt:
            console.print()
            errors.print(Text(f"(the conversation is kept: {CHAT_HINT})", dim))
            continue
        question = line.strip()
        if not question:
            continue
        word = question.split(maxsplit=1)[0]
        if question.startswith("//"):  # `//text` sends `/text`
            question = question[1:]
        elif COMMAND_WORD.fullmatch(word):
            known = {"/quit": "/exit"}.get(word.lower(), word.lower())
            if known not in COMMANDS:
                errors.print(
                    f"unknown command {word} (not sent to the model); the commands are "
                    f"{', '.join(COMMANDS)}; start a line with // to send one that begins with /"
                )
            elif word != question:
                errors.print(f"{word} takes no argument; /help lists the commands")
            elif known == "/exit":
                return 0
            elif known == "/help":
                for command, meaning in COMMANDS.items():
                    console.print(Text(f"{command:<9} {meaning}"))
                console.print(Text("//text    send a line that begins with /"))
            elif known == "/reset":
                answered = sum(not turn.cancelled for turn in turns)
                kept = "; the system prompt is kept" if system else ""
                cleared = (
                    f"forgot {plural(len(turns), 'turn')} ({answered} answered){kept}"
                    if turns
                    else f"nothing to forget{kept}"
                )
                errors.print(Text(f"[conversation cleared: {cleared}]", dim))
                turns = []
            else:
                show_history(system, turns, console, errors)
            continue
        messages = [*conversation(system, turns), ChatMessage("user", question)]
        note = ": kept in /history as cancelled, and left out of the conversation"
        shown = stream(engine.submit(Request(messages, config)), console, errors, marks, note)
        turns.append(Turn(question, shown.text, cancelled=shown.finished is None))
        if shown.finished is not None:
            turns[-1].answer = shown.finished.text


def show_history(system: str | None, turns: list[Turn], console: Console, errors: Console) -> None:
    if not system and not turns:
        errors.print(Text("[the conversation is empty]", "dim"))
    if system:
        console.print(Text(f"system: {system}"))
    for turn in turns:
        console.print(Text(f"user: {turn.question}"))
        if turn.cancelled:
            console.print(Text(f"assistant {CANCELLED}: {turn.answer}", "dim"))
        else:
            console.print(Text(f"assistant: {turn.answer}"))
    if any(turn.cancelled for turn in turns):
        errors.print(Text("(cancelled answers are not part of the conversation)", "dim"))


def run_chat(args: argparse.Namespace, console: Console, errors: Console) -> int:
    config = config_from_args(args)
    marks = args.marks
    if marks == "auto":
        marks = "color" if console.is_terminal else "brackets"
    question = args.question
    terminal = sys.stdin is not None and sys.stdin.isatty()
    if question is None and sys.stdin is not None and not terminal:  # a pipe or a file
        question = sys.stdin.read().strip() or None
        if question is None:
            errors.print(Text(f"(standard input is empty: asking {DEFAULT_QUESTION!r})", "dim"))
    chatting = args.question is None and terminal and not args.json
    messages = [ChatMessage("user", question or DEFAULT_QUESTION)]
    if args.system is not None:
        messages.insert(0, ChatMessage("system", args.system))
    pair = load_pair(args)
    engine = NudgingEngine(pair)
    try:
        if chatting:
            return interactive(engine, args.system, config, console, errors, marks)
        if args.compare:
            answers = run_compare(engine, messages, config, console, marks)
            if args.json:
                print(json.dumps({m: as_json(a) for m, a in answers.items()}, ensure_ascii=False))
            return 0
        handle = engine.submit(Request(messages, config))
        if args.json:
            payload = {
                **as_json(handle.result()),
                "models": {"base": pair.base.name, "nudging": pair.nudging.name},
                "config": config.model_dump(mode="json"),
            }
            print(json.dumps(payload, ensure_ascii=False))
            return 0
        return 0 if stream(handle, console, errors, marks).finished is not None else 130
    finally:
        engine.shutdown()


def run_eval_command(args: argparse.Namespace, console: Console, errors: Console) -> int:
    from .evaluation.report import main_table, write_report  # matplotlib: only for eval

    settings = EvalSettings(
        tasks=tuple(name for group in args.task for name in group),
        modes=tuple(args.modes),
        gammas=tuple(gamma for group in args.gamma for gamma in group),
        limit=args.limit,
        seed=args.seed,
        **{name: getattr(args, name) for name in EVAL_KNOBS},
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        with _transformers_bars(args.verbose):  # "Loading weights" bars on every start
            if args.command == "eval":
                return run_eval_command(args, console, errors)
            return run_chat(args, console, errors)
    except ValidationError as exc:
        errors.print(f"nudging: invalid option: {_validation_message(exc)}")
    except (ModelLoadError, ValueError, ScoringSetupError, ServerError) as exc:
        errors.print(f"nudging: {exc}")
    except KeyboardInterrupt:
        errors.print("nudging: interrupted")
        return 130
    return 2


def _validation_message(exc: ValidationError) -> str:
    """Each error with its field, and the field's flag where it has one."""
    messages = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        shown = f"{name} ({flag(name)})" if name in CHAT_KNOBS else name
        messages.append(f"{shown}: {err['msg']}")
    return "; ".join(messages)


if __name__ == "__main__":
    sys.exit(main())
