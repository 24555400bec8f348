"""A second, independent implementation of the nudging rules, written from docs/algorithm.md.

:func:`independent_nudge` follows the shape of the authors' ``completion_with_nudging``: one
``while`` loop over rounds, every question asked about ``prompt + answer`` from scratch (one
full forward pass for a boundary, one fresh decode for a draft or a window), no state kept
between questions. It shares no code with ``algorithm.py`` (word splitting, acceptance,
windows, the character carry of rule 7, stop strings, the repeated-suffix rule, the loop
breakers, the turn-marker rule 8, the round and window caps, what a window streams before it
ends are all written again here); it uses only gamma's rule (``config.confident``) and the
tokenizer layer (``backends/hf.py``: ids, the text of new ids, token counts).

What equality shows:

* ``independent_nudge == engine`` (text and finish reason, greedy float32): the library
  implements the *rules as documented*. An error in ``algorithm.py``'s reading of a rule (a
  wrong boundary, a stop rule applied in the wrong place, a window that ends at the wrong
  token, a marker cut where it is content) shows up as a difference, because nothing of
  ``algorithm.py`` runs here.
* ``reference_nudge == engine`` (reference.py: ``NudgingRun`` over an uncached backend): the
  *backend* changes nothing. Caching, cache crops, batched boundary verification, remembered
  choices and the engine's batched passes give what the same rules give when every question
  is asked from scratch. It cannot find an error in the rules themselves, since both sides
  run ``algorithm.py``.

Neither oracle checks what both sides share: the prompts (prompts.py), the tokenizer layer
(``TokenizerText.encode``, ``texts``, ``count``, ``truncate``) and the rules' text itself.

Greedy decoding only: under sampling the two implementations would draw different numbers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from .backends.base import ContextWindowError
from .backends.hf import TokenizerText
from .config import NudgingConfig, confident

if TYPE_CHECKING:
    from .models import LoadedModel

OracleMode = Literal["nudged", "base", "nudging"]
DEFAULT_MARKERS = ("\nQuestion:", "\nAnswer:")
CARRY = 3  # a UTF-8 character has at most 4 bytes: at most 3 more tokens complete it
BASE, NUDGE = "b", "n"  # who wrote a character of the answer


# --- pure helpers (unit-tested against the doc's examples) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Tok:
    """One decision of a model: the id it picked (greedy: the raw top-1) and what it adds.

    ``open_char``: the text after this token ends inside a UTF-8 character (rule 7).
    ``at``: the answer's length in characters when the question was asked.
    """

    id: int
    text: str
    p1: float
    p2: float
    eos: bool = False
    open_char: bool = False
    at: int = -1


def draft_words(draft: str) -> tuple[str, list[str]]:
    """Rule 3: leading spaces set aside, the rest split on single spaces (newlines stay)."""
    n = 0
    while n < len(draft) and draft[n] == " ":
        n += 1
    return draft[:n], draft[n:].split(" ")


def agreement(tok: Tok, next_word: str) -> bool:
    """Rule 3: the base token's text is a prefix of ``" " + next_word`` (never empty, never EOS)."""
    if tok.eos or tok.text == "":
        return False
    return (" " + next_word)[: len(tok.text)] == tok.text


def completes_stop(before: str, after: str, stops: Sequence[str]) -> bool:
    """An occurrence of a stop string in ``before + after`` that ends inside ``after``."""
    joined = before + after
    return any(joined.find(s, max(0, len(before) - len(s) + 1)) != -1 for s in stops)


def window_end(
    toks: Sequence[Tok],
    size: int,
    *,
    gamma: float | None = None,
    forced: int = 0,
    stops: Sequence[str] = (),
    answer: str = "",
) -> tuple[int, str] | None:
    """Where a window (or a draft) over ``toks`` ends: ``(tokens taken, why)``, or ``None``
    when ``toks`` is too short to say.

    ``why``: ``"eos"`` (an end-of-sequence token, not taken), ``"unsure"`` (top-1 below
    ``gamma``, not taken; the first ``forced`` tokens are taken whatever their probability),
    ``"stop"`` (the token whose text completes a stop string of ``stops`` in ``answer``
    followed by the window's text) or ``"full"`` (``size`` tokens, and up to ``CARRY`` more
    while a character is open).
    """
    text = ""
    for k, tok in enumerate(toks):
        if tok.eos:
            return k, "eos"
        if gamma is not None and k >= forced and not confident(tok.p1, gamma):
            return k, "unsure"
        text += tok.text
        taken = k + 1
        if stops and completes_stop(answer, text, stops):
            return taken, "stop"
        if taken >= size and (not tok.open_char or taken >= size + CARRY):
            return taken, "full"
    return None


def doubled_suffix(text: str, min_chars: int) -> int:
    """The longest ``L >= min_chars`` such that ``text`` ends with the same ``L`` characters
    twice in a row; 0 if none."""
    n = len(text)
    for length in range(n // 2, max(min_chars, 1) - 1, -1):
        if text[n - 2 * length : n - length] == text[n - length :]:
            return length
    return 0


def repetition_end(text: str, start: int, min_chars: int) -> int:
    """Where the repeated-suffix rule cuts ``text``: each second copy removed in turn (so the
    text no longer ends with a doubled suffix), never before ``start``."""
    end = len(text)
    while end > start:
        length = doubled_suffix(text[:end], min_chars)
        if not length:
            break
        end = max(start, end - length)
    return end


def second_copy_start(text: str, min_chars: int) -> int:
    """Where a second copy of an earlier passage may have begun: the start of the longest
    suffix of ``text`` that also occurs ending at least ``min_chars`` characters before the end
    (``len(text)`` when none does)."""
    limit = len(text) - min_chars
    k = 0
    while k < limit and text[len(text) - k - 1 :] in text[:limit]:
        k += 1
    return len(text) - k


def stop_prefix_held(text: str, strings: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could be the start of one of ``strings``."""
    held = 0
    for s in strings:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text[len(text) - k :] == s[:k]:
                held = k
                break
    return held


def label_offset(marker: str) -> int:
    """Index of a turn marker's label: its first character after the separator's newline."""
    return min(len(marker) - len(marker.lstrip()), max(len(marker) - 1, 0))


def occurrences(text: str, s: str) -> list[int]:
    out, at = [], text.find(s)
    while at != -1:
        out.append(at)
        at = text.find(s, at + 1)
    return out


# --- models asked from scratch -----------------------------------------------------------------


class _Lm:
    """One model and its tokenizer; every call starts from ``prompt + answer`` re-tokenized."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.text = TokenizerText(
            loaded.tokenizer, loaded.model, loaded.context_window, loaded.name
        )
        self.model = loaded.model
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.calls = 0

    def ids(self, prompt: str, answer: str) -> list[int]:
        # A Prompt (str with control spans) reaches the encoder unjoined: its markers count.
        return self.text.encode(prompt, answer)

    def _tok(
        self, ctx: list[int], new: list[int], probs: list[tuple[float, float]], at: int
    ) -> list[Tok]:
        texts = self.text.texts(ctx, new)
        tail = ctx[-4:]
        out = []
        for k, (token_id, (p1, p2)) in enumerate(zip(new, probs, strict=True)):
            eos = token_id in self.text.stop_ids
            open_char = not eos and self.text.decode(tail + new[: k + 1]).endswith("\ufffd")
            out.append(Tok(token_id, texts[k], p1, p2, eos, open_char, at))
        return out

    @staticmethod
    def _choice(logits: torch.Tensor) -> tuple[int, float, float]:
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, 2)
        return int(top.indices[0]), float(top.values[0]), float(top.values[1])

    @torch.inference_mode()
    def next(self, prompt: str, answer: str) -> Tok:
        """The model's next token after ``prompt + answer``: one full forward pass."""
        ids = self.ids(prompt, answer)
        self.calls += 1
        logits = self.model(
            input_ids=torch.tensor([ids], device=self.model.device),
            use_cache=False,
            logits_to_keep=1,  # as a completions server computes only the next token's
        ).logits[0, -1]
        token_id, p1, p2 = self._choice(logits)
        return self._tok(ids, [token_id], [(p1, p2)], len(answer))[0]

    @torch.inference_mode()
    def decode_from(
        self,
        prompt: str,
        answer: str,
        limit: int,
        done: Callable[[list[Tok]], bool],
        head: Tok | None = None,
    ) -> list[Tok]:
        """Greedy tokens after ``prompt + answer`` (and ``head``, already chosen), until
        ``done(tokens)``, an end-of-sequence token or ``limit`` tokens in all."""
        ctx = self.ids(prompt, answer)
        self.calls += 1
        new = [head.id] if head is not None else []
        probs = [(head.p1, head.p2)] if head is not None else []
        toks = self._tok(ctx, new, probs, len(answer))
        if toks and (toks[-1].eos or done(toks)):
            return toks
        device = self.model.device
        feed = ctx + new
        cache = None
        while len(new) < limit:
            kwargs: dict[str, Any] = {"use_cache": True, "logits_to_keep": 1}
            if cache is not None:
                kwargs[self._cache_arg] = cache
            out = self.model(input_ids=torch.tensor([feed], device=device), **kwargs)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            token_id, p1, p2 = self._choice(out.logits[0, -1])
            new.append(token_id)
            probs.append((p1, p2))
            toks = self._tok(ctx, new, probs, len(answer))
            if toks[-1].eos or done(toks):
                break
            feed = [token_id]
        return toks


# --- the answer and its stop rules -------------------------------------------------------------


@dataclass
class OracleResult:
    """The finished answer. ``sources`` has one letter per character of ``text``: ``"b"``
    (base) or ``"n"`` (nudging model); ``stream`` is what would have been released, piece by
    piece (its join is ``text``); ``decisions`` every token decision made, for near-ties."""

    text: str
    finish_reason: str
    sources: str
    stream: list[tuple[str, str]]
    rounds: int
    windows: int
    decisions: list[Tok] = field(default_factory=list)
    #: Each turn-marker occurrence judged: (index, marker, "turn" | "content" | "nudge-written").
    verdicts: list[tuple[int, str, str]] = field(default_factory=list)


class _Answer:
    """The joined answer: rules 5 and 8 applied at every append, the possible-stop tail held."""

    def __init__(
        self,
        config: NudgingConfig,
        markers: Sequence[str],
        mode: OracleMode,
        base: _Lm,
        marker_is_content: Callable[[str, str], bool],
    ) -> None:
        self.config = config
        self.markers = tuple(markers)
        self.mode = mode
        self.base = base
        self.marker_is_content = marker_is_content
        self.text = ""
        self.sources = ""
        self.reason: str | None = None
        self.stream: list[tuple[str, str]] = []
        self._sent = 0
        self._judged: set[tuple[str, int]] = set()
        self.verdicts: list[tuple[int, str, str]] = []

    @property
    def done(self) -> bool:
        return self.reason is not None

    @property
    def held(self) -> tuple[str, ...]:
        """The strings whose possible start is held back: stop strings and turn markers."""
        return self.config.stop + (self.markers if self.mode != "nudging" else ())

    def add(self, piece: str, source: str) -> None:
        if self.done or not piece:
            return
        start = len(self.text)
        floor = max(start, self._sent)  # text already streamed is never cut
        self.text += piece
        self.sources += source * len(piece)
        cut = self._cut(start, floor)
        if cut is not None:
            at, why = cut
            self.text, self.sources = self.text[:at], self.sources[:at]
            self.reason = why
            self._send(len(self.text), self.text, self.sources)
        else:
            upto = len(self.text) - stop_prefix_held(self.text, self.held)
            self._send(upto, self.text, self.sources)

    def show(self, piece: str, source: str) -> None:
        """Stream what of the answer followed by ``piece`` (a window's text so far, added
        whole when the window ends) no rule applied then can take back: nothing once it
        reaches ``max_tokens`` tokens; else all before a complete stop string or marker, a
        possible start of one, and a possible second copy of an earlier passage."""
        joined = self.text + piece
        config = self.config
        if self.done or self.base.text.count(joined) >= config.max_tokens:
            return
        upto = len(joined) - stop_prefix_held(joined, self.held)
        for s in self.held:
            at = joined.find(s, max(0, len(self.text) - len(s) + 1))
            if at != -1:
                upto = min(upto, at)
        if config.repetition_stops:
            upto = min(upto, second_copy_start(joined, config.min_repeat_chars))
        self._send(upto, joined, self.sources + source * len(piece))

    def end(self, why: str) -> None:
        if self.reason is None:
            self.reason = why
        self._send(len(self.text), self.text, self.sources)

    def _send(self, upto: int, text: str, sources: str) -> None:
        while self._sent < upto:
            run = self._sent
            while run < upto and sources[run] == sources[self._sent]:
                run += 1
            self.stream.append((text[self._sent : run], sources[self._sent]))
            self._sent = run

    def _cut(self, start: int, floor: int) -> tuple[int, str] | None:
        """The earliest cut any rule makes in the joined answer (ties: stop, length,
        repetition); the length cap and repetition never cut before ``floor``."""
        text, config = self.text, self.config
        cuts: list[tuple[int, int, str]] = []
        found = [i for s in config.stop if (i := text.find(s)) != -1]
        if found:
            cuts.append((min(found), 0, "stop"))
        if self.base.text.count(text) >= config.max_tokens:
            kept = self.base.text.truncate(text, config.max_tokens)
            same = 0
            while same < min(len(kept), len(text)) and kept[same] == text[same]:
                same += 1
            cuts.append((max(same, floor), 2, "length"))
        if config.repetition_stops:
            end = repetition_end(text, floor, config.min_repeat_chars)
            if end < len(text):
                cuts.append((end, 3, "repetition"))
        if self.mode != "nudging":
            found_markers = sorted(
                (i, m)
                for m in self.markers
                for i in occurrences(text, m)
                if (m, i) not in self._judged
            )
            for i, marker in found_markers:
                if cuts and (i, 1) >= min(cuts)[:2]:
                    break  # cut away by an earlier rule: never judged
                self._judged.add((marker, i))
                verdict = self._verdict(i, marker)
                self.verdicts.append((i, marker, verdict))
                if verdict == "turn":
                    cuts.append((i, 1, "stop"))
                    break
        if not cuts:
            return None
        at, _, why = min(cuts)
        return at, why

    def _verdict(self, at: int, marker: str) -> str:
        """Rule 8: does this occurrence mean that the base model is starting a new turn?"""
        if self.mode == "base":
            return "turn"
        if self.sources[at + label_offset(marker)] != BASE:
            return "nudge-written"
        return "content" if self.marker_is_content(self.text[:at], marker) else "turn"


# --- the loop ----------------------------------------------------------------------------------


def independent_nudge(
    base: LoadedModel,
    nudging: LoadedModel,
    base_prompt: str,
    nudging_prompt: str,
    config: NudgingConfig,
    mode: OracleMode = "nudged",
    markers: Sequence[str] = DEFAULT_MARKERS,
) -> OracleResult:
    """Write one answer by the documented rules, every question asked from scratch.

    ``base`` and ``nudging``: the loaded models (``.model``, ``.tokenizer``).
    ``config.stop``: the request's own stop strings; ``markers``: the base transcript's turn
    markers (``render_prompts(...).stop``), which end the answer only as rule 8 says.
    """
    if mode not in ("nudged", "base", "nudging"):
        raise ValueError(f"mode: {mode!r}")
    if not (config.base_sampling.greedy and config.nudging_sampling.greedy):
        raise ValueError("the independent oracle is greedy only")
    if config.base_sampling.penalized or config.nudging_sampling.penalized:
        raise ValueError(
            "the independent oracle has no repetition controls (reference_nudge has them)"
        )
    b, n = _Lm(base), _Lm(nudging)
    decisions: list[Tok] = []

    def marker_is_content(before: str, marker: str) -> bool:
        # The nudging model, reading the answer up to the marker, would write it itself.
        c = n.text.count(marker)
        toks = n.decode_from(nudging_prompt, before, c + 1, lambda ts: len(ts) >= c + 1)
        decisions.extend(toks)
        return "".join(t.text for t in toks if not t.eos).startswith(marker)

    answer = _Answer(config, markers, mode, b, marker_is_content)
    counters = {"rounds": 0, "windows": 0}
    try:
        if mode == "nudged":
            _nudged(b, n, base_prompt, nudging_prompt, config, answer, counters, decisions)
        else:
            lm, prompt = (b, base_prompt) if mode == "base" else (n, nudging_prompt)
            stops = config.stop + (tuple(markers) if mode == "base" else ())
            source = BASE if mode == "base" else NUDGE
            _solo(lm, prompt, config, answer, counters, decisions, stops, source)
    except ContextWindowError:
        answer.end("length")
    assert answer.reason is not None
    return OracleResult(
        text=answer.text,
        finish_reason=answer.reason,
        sources=answer.sources,
        stream=answer.stream,
        rounds=counters["rounds"],
        windows=counters["windows"],
        decisions=decisions,
        verdicts=answer.verdicts,
    )


def _window(
    lm: _Lm,
    prompt: str,
    answer: str,
    size: int,
    *,
    gamma: float | None = None,
    head: Tok | None = None,
    stops: Sequence[str] = (),
) -> tuple[list[Tok], list[Tok], str]:
    """One window: (all tokens looked at, the tokens taken, why it ended)."""
    forced = 1 if head is not None else 0

    def end_of(toks: Sequence[Tok]) -> tuple[int, str] | None:
        return window_end(toks, size, gamma=gamma, forced=forced, stops=stops, answer=answer)

    toks = lm.decode_from(prompt, answer, size + CARRY, lambda ts: end_of(ts) is not None, head)
    end = end_of(toks)
    if end is None:  # only a model that stops writing ids (never here) leaves it open
        raise RuntimeError("a window ended before its rules decided")
    taken, why = end
    return toks, toks[:taken], why


def _size(config: NudgingConfig, b: _Lm, answer: str, limit: int) -> int:
    return max(1, min(limit, config.max_tokens - b.text.count(answer)))


def _solo(
    lm: _Lm,
    prompt: str,
    config: NudgingConfig,
    answer: _Answer,
    counters: dict[str, int],
    decisions: list[Tok],
    stops: Sequence[str],
    source: str,
) -> None:
    while not answer.done:
        if counters["windows"] >= config.max_tokens:
            answer.end("length")
            return
        counters["windows"] += 1
        counters["rounds"] += 1
        size = _size(config, answer.base, answer.text, config.chunk_tokens)
        toks, taken, why = _window(lm, prompt, answer.text, size, stops=stops)
        decisions.extend(toks)
        for k in range(1, len(taken) + 1):  # streamed as the tokens come
            answer.show("".join(t.text for t in taken[:k]), source)
        text = "".join(t.text for t in taken)
        answer.add(text, source)
        if answer.done:
            return
        if why == "eos" or not text:
            answer.end("stop")


def _nudged(
    b: _Lm,
    n: _Lm,
    base_prompt: str,
    nudging_prompt: str,
    config: NudgingConfig,
    answer: _Answer,
    counters: dict[str, int],
    decisions: list[Tok],
) -> None:
    last_words, same = None, 0
    while not answer.done:
        # Rule 5: the round cap.
        if counters["rounds"] >= config.max_rounds:
            answer.end("round_cap")
            return
        counters["rounds"] += 1

        # Rule 2: the draft.
        toks, taken, why = _window(n, nudging_prompt, answer.text, config.draft_tokens)
        decisions.extend(toks)
        draft = "".join(t.text for t in taken)
        if why == "eos":
            answer.add(draft, NUDGE)
            answer.end("stop")
            return

        # Rule 3: word acceptance, one boundary asked at a time as far as needed.
        lead, words = draft_words(draft)
        accepted = lead + " ".join(words[: max(1, len(words) - 1)])
        boundary: Tok | None = None
        for i in range(1, len(words)):
            if words[i] == "":
                continue
            candidate = lead + " ".join(words[:i])
            tok = b.next(base_prompt, answer.text + candidate)
            decisions.append(tok)
            if agreement(tok, words[i]) or confident(tok.p1, config.gamma):
                accepted, boundary = candidate, tok
                break

        # Rule 5: the same accepted words again and again.
        if accepted == last_words:
            same += 1
            if config.repetition_stops and same >= config.max_same_nudges:
                answer.end("repetition")
                return
        else:
            last_words, same = accepted, 0
        answer.add(accepted, NUDGE)
        if answer.done or boundary is None or boundary.eos:
            continue

        # Rule 4: the base turn.
        before = answer.text
        answer.add(boundary.text, BASE)
        passage = boundary.text
        head: Tok | None = boundary
        while not answer.done:
            if counters["windows"] >= config.max_tokens:
                answer.end("length")
                return
            counters["windows"] += 1
            size = _size(config, b, before, config.chunk_tokens)
            toks, taken, why = _window(
                b, base_prompt, before, size, gamma=config.gamma, head=head, stops=config.stop
            )
            decisions.extend(toks[1:] if head is not None else toks)
            if head is not None:
                taken = taken[1:]  # the boundary token is already in the answer
            head = None
            # Streamed as the tokens come, once the window's text is not in the answer: then
            # neither loop breaker below can drop it.
            for k in range(1, len(taken) + 1):
                part = "".join(t.text for t in taken[:k])
                if part and part not in answer.text:
                    answer.show(part, BASE)
            text = "".join(t.text for t in taken)
            if not text:
                if taken or why in ("eos", "unsure"):
                    break  # a window whose taken tokens add no text ends the base turn
                before = answer.text  # a first window of one token: the boundary alone
                continue
            if why in ("full", "stop") and text in passage:
                break  # loop breaker: this window was already written in this round
            if len(text.split()) > config.loop_passage_words and text in answer.text:
                break  # loop breaker: a long passage already in the answer
            answer.add(text, BASE)
            passage += text
            if why in ("eos", "unsure"):
                break
            before = answer.text
