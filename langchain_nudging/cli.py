"""The ``nudging`` command: ask the nudged pair a question and watch who writes what."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from .algorithm import Segment
from .config import NudgingConfig, SamplingConfig
from .generation import Generation, NudgingPair
from .models import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID, ModelLoadError
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
    chat.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    models = chat.add_argument_group("models")
    models.add_argument("--base", default=BUNDLED_BASE_ID, help="base model: id, folder or .gguf")
    models.add_argument(
        "--nudging", default=BUNDLED_NUDGING_ID, help="nudging model: id, folder or .gguf"
    )
    models.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    models.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    models.add_argument("--device-map", default=None, help="accelerate device_map, e.g. auto")
    models.add_argument("--trust-remote-code", action="store_true")
    models.add_argument("--cache-dir", default=None, help="where converted GGUF models live")
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
        "--marks",
        choices=["auto", "color", "brackets", "none"],
        default="auto",
        help=f"how nudged text is shown (auto: colour on a tty, else {OPEN_MARK}..{CLOSE_MARK})",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> NudgingConfig:
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


def load_pair(args: argparse.Namespace) -> NudgingPair:
    options = {
        "dtype": args.dtype,
        "device": args.device,
        "device_map": args.device_map,
        "trust_remote_code": args.trust_remote_code,
        "cache_dir": args.cache_dir,
    }
    return NudgingPair.load(args.base, args.nudging, **options)


def summary(generation: Generation) -> str:
    stats = generation.stats
    total = stats.base_tokens + stats.nudge_tokens
    speed = total / stats.wall_time if stats.wall_time else 0.0
    return (
        f"{total} tokens · {stats.nudged_share:.0%} nudged ({stats.nudge_tokens} tokens, "
        f"{stats.nudge_words} words) · {stats.rounds} rounds · {stats.wall_time:.1f} s · "
        f"{speed:.1f} tokens/s · finish: {stats.finish_reason}"
    )


def show(segment: Segment, console: Console, marks: str) -> None:
    if segment.source == "nudge" and marks == "color":
        console.print(Text(segment.text, style=NUDGE_STYLE), end="")
    elif segment.source == "nudge" and marks == "brackets":
        console.print(Text(OPEN_MARK + segment.text + CLOSE_MARK), end="")
    else:
        console.print(Text(segment.text), end="")


def run_chat(args: argparse.Namespace, console: Console, errors: Console) -> int:
    config = config_from_args(args)
    messages = [ChatMessage("user", args.question)]
    if args.system is not None:
        messages.insert(0, ChatMessage("system", args.system))
    pair = load_pair(args)
    generation = pair.generate(messages, config)
    if args.json:
        segments = list(generation)
        payload = {
            "text": generation.text,
            "segments": [
                {"text": s.text, "source": s.source, "base_top1_prob": s.base_top1_prob}
                for s in segments
            ],
            "stats": generation.stats.as_dict(),
            "models": {"base": pair.base.name, "nudging": pair.nudging.name},
            "config": config.model_dump(mode="json"),
        }
        print(json.dumps(payload, ensure_ascii=False))
        return 0
    marks = args.marks
    if marks == "auto":
        marks = "color" if console.is_terminal else "brackets"
    for segment in generation:
        show(segment, console, marks)
    console.print()
    errors.print(Text(summary(generation), style="dim"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return run_chat(args, console, errors)
    except ValidationError as exc:
        errors.print(f"nudging: invalid option: {_validation_message(exc)}")
    except (ModelLoadError, ValueError) as exc:
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
