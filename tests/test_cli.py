"""The `nudging` command in-process, over the scripted backend (tests/scripted_backend.py): where
the question comes from, the interactive chat's commands and Ctrl-C, the summary's words, the
help text, the libraries' progress bars, and bad GGUF files reported before anything loads."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scripted_backend
from rich.console import Console
from scripted_backend import SCRIPT

from langchain_nudging import NudgingConfig, NudgingPair, cli
from langchain_nudging.cli import CHAT_KNOBS, COMMANDS, DEFAULT_QUESTION, build_parser, main
from langchain_nudging.models import ModelLoadError, check_source
from langchain_nudging.request import Request
from langchain_nudging.serving.engine import NudgingEngine
from langchain_nudging.serving.events import SegmentEvent
from langchain_nudging.serving.generation import GenerationStats

BASE, NUDGING = f"{scripted_backend.PREFIX}base", f"{scripted_backend.PREFIX}chat"
SCRIPTED = ["--base", BASE, "--nudging", NUDGING]


class Stdin(io.StringIO):
    """Standard input with a chosen answer to ``isatty``."""

    def __init__(self, text: str = "", terminal: bool = False) -> None:
        super().__init__(text)
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    """Every request the command submits to its engine."""
    requests: list[Request] = []
    submit = NudgingEngine.submit

    def recording(self: NudgingEngine, request: Request) -> Any:
        requests.append(request)
        return submit(self, request)

    monkeypatch.setattr(NudgingEngine, "submit", recording)
    return requests


# -- where the question comes from ------------------------------------------------------------


def test_a_piped_question_is_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], asked: list[Request]
) -> None:
    monkeypatch.setattr("sys.stdin", Stdin("What is 2+2?\n"))
    assert main(["chat", *SCRIPTED, "--json"]) == 0
    assert [m.content for m in asked[0].messages] == ["What is 2+2?"]
    assert json.loads(capsys.readouterr().out)["text"] == SCRIPT


def test_a_piped_question_streams_like_a_given_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], asked: list[Request]
) -> None:
    monkeypatch.setattr("sys.stdin", Stdin("Line one\nline two\n"))
    assert main(["chat", *SCRIPTED, "--system", "Be brief."]) == 0
    assert [m.content for m in asked[0].messages] == ["Be brief.", "Line one\nline two"]
    assert "finish:" in capsys.readouterr().err


def test_empty_stdin_asks_the_default_question(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], asked: list[Request]
) -> None:
    monkeypatch.setattr("sys.stdin", Stdin("  \n"))
    assert main(["chat", *SCRIPTED, "--json"]) == 0
    assert asked[0].messages[-1].content == DEFAULT_QUESTION
    assert "standard input is empty" in capsys.readouterr().err


def test_a_question_argument_wins_over_stdin(
    monkeypatch: pytest.MonkeyPatch, asked: list[Request]
) -> None:
    monkeypatch.setattr("sys.stdin", Stdin("from stdin"))
    assert main(["chat", *SCRIPTED, "--json", "from the argument"]) == 0
    assert asked[0].messages[-1].content == "from the argument"


# -- the interactive chat ------------------------------------------------------------------------


class Chat:
    """The interactive chat on the scripted pair, fed lines (or ``KeyboardInterrupt`` /
    ``EOFError``, as Ctrl-C and Ctrl-D at the prompt raise them) as if typed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cancel_on: str = "\0") -> None:
        self.monkeypatch, self.cancel_on = monkeypatch, cancel_on
        self.out, self.err = io.StringIO(), io.StringIO()
        self.requests: list[Request] = []

    def run(self, *typed: str | type[BaseException], system: str | None = None) -> int:
        lines: Iterator[str | type[BaseException]] = iter(typed)

        def typing(*_args: Any) -> str:
            line = next(lines, EOFError)
            if isinstance(line, type):
                raise line
            return line

        self.monkeypatch.setattr("builtins.input", typing)
        engine = NudgingEngine(NudgingPair.load(BASE, NUDGING))
        chat = self

        class Interrupting:
            """The engine, with Ctrl-C pressed once the first segment of an answer shows."""

            def submit(self, request: Request) -> Any:
                chat.requests.append(request)
                handle = engine.submit(request)
                if chat.cancel_on not in request.messages[-1].content:
                    return handle

                class Handle:
                    def __iter__(self) -> Iterator[Any]:
                        for event in handle:
                            yield event
                            if isinstance(event, SegmentEvent):
                                raise KeyboardInterrupt

                    def cancel(self) -> None:
                        handle.cancel()

                return Handle()

        console = Console(file=self.out, highlight=False, soft_wrap=True)
        errors = Console(file=self.err, highlight=False, soft_wrap=True)
        try:
            return cli.interactive(
                Interrupting(),  # type: ignore[arg-type]
                system,
                NudgingConfig(max_tokens=64),
                console,
                errors,
                "brackets",
            )
        finally:
            assert engine.shutdown(timeout=10)


def test_ctrl_c_at_the_prompt_keeps_the_conversation(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(monkeypatch)
    assert chat.run("Capital?", KeyboardInterrupt, KeyboardInterrupt, "/history") == 0
    assert "conversation is kept" in chat.err.getvalue()
    assert "Ctrl-D or /exit leaves" in chat.err.getvalue()
    assert f"user: Capital?\nassistant: {SCRIPT}\n" in chat.out.getvalue()


def test_ctrl_d_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(monkeypatch)
    assert chat.run(EOFError, "never read") == 0
    assert chat.requests == []


def test_a_cancelled_answer_is_kept_in_the_history_marked(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(monkeypatch, cancel_on="dragon")
    assert chat.run("A dragon story?", "/history", "Capital?", "/history") == 0
    err, out = chat.err.getvalue(), chat.out.getvalue()
    assert "[answer cancelled]: kept in /history as cancelled" in err
    assert "user: A dragon story?\nassistant [answer cancelled]: P" in out
    assert "cancelled answers are not part of the conversation" in err
    # The cancelled turn is not sent again: the next question is asked without it.
    assert [m.content for m in chat.requests[1].messages] == ["Capital?"]
    assert out.endswith(f"user: Capital?\nassistant: {SCRIPT}\nyou> \n")


def test_reset_says_what_it_forgot(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(monkeypatch)
    assert chat.run("/reset", "One?", "Two?", "/reset", "/history", "Three?") == 0
    err = chat.err.getvalue()
    assert "[conversation cleared: nothing to forget]" in err
    assert "[conversation cleared: forgot 2 turns (2 answered)]" in err
    assert "[the conversation is empty]" in err
    assert [m.content for m in chat.requests[-1].messages] == ["Three?"]


def test_reset_keeps_the_system_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(monkeypatch)
    assert chat.run("One?", "/reset", "Two?", system="Be brief.") == 0
    assert "forgot 1 turn (1 answered); the system prompt is kept" in chat.err.getvalue()
    assert [m.content for m in chat.requests[-1].messages] == ["Be brief.", "Two?"]


def test_help_lists_the_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(monkeypatch)
    assert chat.run("/help") == 0
    for command in COMMANDS:
        assert command in chat.out.getvalue()
    assert chat.requests == []


@pytest.mark.parametrize("typed", ["/hepl", "/Foo bar", "/history please"])
def test_an_unknown_or_misused_command_is_not_sent(
    monkeypatch: pytest.MonkeyPatch, typed: str
) -> None:
    chat = Chat(monkeypatch)
    assert chat.run(typed) == 0
    assert chat.requests == []
    err = chat.err.getvalue()
    assert typed.split()[0] in err
    assert "/help" in err


def test_quit_leaves_and_slashed_text_is_a_question(monkeypatch: pytest.MonkeyPatch) -> None:
    chat = Chat(monkeypatch)
    assert chat.run("/usr/bin holds what?", "//reset is a word", "/quit", "never read") == 0
    assert [r.messages[-1].content for r in chat.requests] == [
        "/usr/bin holds what?",
        "/reset is a word",
    ]


# -- the summary and the help --------------------------------------------------------------------


def test_the_summary_counts_in_the_singular_and_the_plural() -> None:
    one = cli.summary(GenerationStats("stop", base_tokens=0, nudge_tokens=1, nudge_words=1,
                                      rounds=1, wall_time=1.0))  # fmt: skip
    assert "1 token · " in one
    assert "(1 token, 1 word)" in one
    assert "1 round · " in one
    two = cli.summary(GenerationStats("stop", base_tokens=2, nudge_tokens=2, nudge_words=0,
                                      rounds=2, wall_time=1.0))  # fmt: skip
    assert "4 tokens · " in two
    assert "(2 tokens, 0 words)" in two
    assert "2 rounds · " in two


def numeric_options() -> Iterator[Any]:
    """``(option, action, declared field or None)`` for each numeric option of each command."""
    commands = next(a for a in build_parser()._actions if a.choices and "chat" in a.choices)
    for name, command in commands.choices.items():
        fields = CHAT_KNOBS if name == "chat" else cli.EvalSettings.model_fields
        for action in command._actions:
            if action.type is int or action.type is float or action.dest == "gamma":
                info = fields.get(action.dest) or CHAT_KNOBS.get(action.dest)
                option = f"{name} {action.option_strings[0]}"
                yield pytest.param(option, action, info, id=option)


@pytest.mark.parametrize(("option", "action", "info"), list(numeric_options()))
def test_every_numeric_option_says_its_default_and_range(
    option: str, action: Any, info: Any
) -> None:
    assert action.help
    assert "default" in action.help, option
    if info is not None and (bounds := cli.value_range(info)):
        assert bounds in action.help, option


def test_the_help_shows_a_default_of_none_as_none(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(>= 1; default: 512)" in help_text
    assert "(default: none)" in help_text  # --seed
    assert "None" not in help_text


# -- the libraries' progress bars -----------------------------------------------------------------


@pytest.mark.parametrize(("argv", "bars"), [([], False), (["--verbose"], True)])
def test_transformers_progress_bars_are_off_while_the_command_runs(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], bars: bool
) -> None:
    from transformers.utils import logging as hf_logging

    seen: list[bool] = []
    load = NudgingPair.load

    def recording(*args: Any, **kwargs: Any) -> NudgingPair:
        seen.append(hf_logging.is_progress_bar_enabled())
        return load(*args, **kwargs)

    monkeypatch.setattr(NudgingPair, "load", recording)
    assert hf_logging.is_progress_bar_enabled()
    assert main(["chat", *SCRIPTED, *argv, "--json", "Capital?"]) == 0
    assert seen == [bars]
    assert hf_logging.is_progress_bar_enabled()  # restored for the rest of the process


# -- bad GGUF files, reported before anything loads ---------------------------------------------


def write_gguf(path: Path, tensors: int = 3) -> Path:
    """A small, valid GGUF file: metadata (a string vocabulary among it) and float32 tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_token_list(["<s>", "a", "b", "ab"])
    for n in range(tensors):
        writer.add_tensor(f"blk.0.t{n}.weight", np.full((64, 16), n, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cut(source: Path, dest: Path, size: int) -> Path:
    with source.open("rb") as whole, dest.open("wb") as part:
        part.write(whole.read(size))
    return dest


def test_a_whole_gguf_file_passes(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "small.gguf")
    assert check_source(path) == str(path.resolve())


def test_a_truncated_gguf_file_is_named_with_its_sizes(tmp_path: Path) -> None:
    whole = write_gguf(tmp_path / "whole.gguf")
    size = whole.stat().st_size
    part = cut(whole, tmp_path / "part.gguf", size - 100)
    with pytest.raises(ModelLoadError) as caught:
        check_source(part)
    message = str(caught.value)
    assert str(part) in message
    assert "truncated" in message
    assert f"byte {size:,}" in message  # where the tensors end
    assert f"holds {size - 100:,} bytes" in message
    assert "free disk space" not in message


def test_a_gguf_file_cut_inside_its_header_is_truncated(tmp_path: Path) -> None:
    part = cut(write_gguf(tmp_path / "whole.gguf"), tmp_path / "part.gguf", 60)
    with pytest.raises(ModelLoadError, match=r"part\.gguf.* is truncated: it ends .* header"):
        check_source(part)


def test_a_truncated_real_gguf_file(tmp_path: Path) -> None:
    from langchain_nudging.backends.registry import BUNDLED_NUDGING_ID
    from langchain_nudging.models.bundled import bundled_gguf

    try:
        real = bundled_gguf(BUNDLED_NUDGING_ID)
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    check_source(real)
    size = real.stat().st_size
    part = cut(real, tmp_path / real.name, size // 2)
    with pytest.raises(ModelLoadError, match="truncated") as caught:
        check_source(part)
    assert f"byte {size:,}" in str(caught.value)


def test_a_bad_file_as_one_model_fails_before_the_other_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a fresh cache the bundled base would be converted first (a minute): the truncated
    nudging model is reported before anything loads or converts."""

    def never(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(NudgingPair, "load", never)
    whole = write_gguf(tmp_path / "whole.gguf")
    part = cut(whole, tmp_path / "nudging.gguf", whole.stat().st_size - 1)
    cache = tmp_path / "fresh-cache"
    assert main(["chat", "--cache-dir", str(cache), "--nudging", str(part), "hi"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--nudging" in err
    assert "truncated" in err
    assert "nudging.gguf" in err
    assert not cache.exists()


def test_a_damaged_bundled_package_file_blames_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    from langchain_nudging.backends.registry import BUNDLED_NUDGING_ID
    from langchain_nudging.models.bundled import bundled_gguf

    part = cut(write_gguf(tmp_path / "whole.gguf"), tmp_path / "part.gguf", 200)

    class Located:
        def locate_file(self, _name: str) -> Path:
            return part

    monkeypatch.setattr(importlib.metadata, "distribution", lambda _name: Located())
    monkeypatch.setattr(importlib.metadata, "version", lambda _name: "0")
    with pytest.raises(ModelLoadError, match=r"missing or incomplete .*truncated"):
        bundled_gguf(BUNDLED_NUDGING_ID)
