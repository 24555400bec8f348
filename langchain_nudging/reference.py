"""The oracle: nudging with no state kept between calls.

Every question re-tokenizes ``prompt + answer`` and recomputes it from scratch (a base-model
boundary check is one full forward pass; a window or a draft is one ``model.generate`` call),
which is what the authors' code does through a completions API. Correct output is defined as
what this produces; the cached backend must match it in greedy float32
(docs/reliability.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, LogitsProcessorList

from .algorithm import NudgingRun
from .backends.base import SessionStats, Token
from .backends.cached import CARRY_TOKENS, common_prefix_length, cut_window
from .backends.hf import TokenChooser, TokenizerText
from .backends.penalties import AfterPrompt, penalty_processors
from .config import NudgingConfig, SamplingConfig

if TYPE_CHECKING:
    from .models import LoadedModel


class ReferenceModel:
    """A loaded model asked every question from scratch."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.name = loaded.name
        self.text = TokenizerText(
            loaded.tokenizer, loaded.model, loaded.context_window, loaded.name
        )

    def session(self, prompt: str, sampling: SamplingConfig) -> ReferenceSession:
        return ReferenceSession(self, prompt, sampling)


class ReferenceSession:
    """The questions of :class:`~.backends.base.TextSession` that the algorithm asks, each
    answered from scratch."""

    def __init__(self, owner: ReferenceModel, prompt: str, sampling: SamplingConfig) -> None:
        self._owner = owner
        self._prompt = prompt
        owner.text.encode(prompt)
        self._chooser = TokenChooser(sampling, owner.model.device)
        self._prompt_ids = owner.text.encode(prompt)
        self._forward_passes = 0
        self._tokens_processed = 0

    @torch.inference_mode()
    def peek(self, answer: str) -> Token:
        text = self._owner.text
        ids = text.encode(self._prompt, answer)
        logits = self._owner.model(
            input_ids=torch.tensor([ids], device=self._owner.model.device),
            use_cache=False,
            logits_to_keep=1,  # as a completions server computes only the next token's
        ).logits[0, -1]
        self._forward_passes += 1
        self._tokens_processed += len(ids)
        start = common_prefix_length(self._prompt_ids, ids)
        token_id, top1, top2 = self._chooser.choose(logits, None, ids[start:])
        return Token(text.texts(ids, [token_id])[0], top1, top2, token_id in text.stop_ids)

    def peek_each(self, answers: Sequence[str]) -> Iterator[Token]:
        """One full forward pass per boundary, only as far as the caller reads."""
        for answer in answers:
            yield self.peek(answer)

    def generate(
        self,
        answer: str,
        max_new_tokens: int,
        *,
        min_prob: float | None = None,
        first: Token | None = None,
        stop: Sequence[str] = (),
    ) -> Iterator[Token]:
        """One ``model.generate`` call for the whole window (its longest possible length),
        run when the first token is asked for; the tokens are then yielded one by one up to
        where the window ends."""
        yield from self._window(answer, max_new_tokens, min_prob, first, stop)

    @torch.inference_mode()
    def _window(
        self,
        answer: str,
        max_new_tokens: int,
        min_prob: float | None,
        first: Token | None,
        stop: Sequence[str],
    ) -> list[Token]:
        text = self._owner.text
        ids = text.encode(self._prompt, answer)
        sampling = self._chooser.sampling
        config = GenerationConfig(
            max_new_tokens=max_new_tokens + CARRY_TOKENS,
            do_sample=not sampling.greedy,
            temperature=sampling.temperature or 1.0,
            top_p=sampling.top_p,
            top_k=sampling.top_k or None,
            eos_token_id=sorted(text.stop_ids),
            pad_token_id=text.tokenizer.pad_token_id or sorted(text.stop_ids)[0],
            min_p=sampling.min_p or None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        # The repetition controls read the answer only: the ids after the prompt's.
        processors = LogitsProcessorList()
        if sampling.penalized:
            start = common_prefix_length(self._prompt_ids, ids)
            processors.append(AfterPrompt(penalty_processors(sampling), start))
        device = self._owner.model.device
        # nn.Module's __getattr__ typing hides GenerationMixin.generate from type checkers.
        result = self._owner.model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            generation_config=config,
            logits_processor=processors,
        )
        self._forward_passes += len(result.logits)
        self._tokens_processed += len(ids) + len(result.logits) - 1
        new = result.sequences[0, len(ids) :].tolist()
        choices = []
        for token_id, logits in zip(new, result.logits, strict=False):
            top = torch.topk(torch.softmax(logits[0].float(), dim=-1), 2).values.tolist()
            choices.append((token_id, top[0], top[1]))
        detokenizer = text.detokenizer(ids)
        return list(
            cut_window(
                choices, detokenizer, text.stop_ids, answer, max_new_tokens, min_prob, first, stop
            )
        )

    def count_tokens(self, text: str) -> int:
        return self._owner.text.count(text)

    def truncate_tokens(self, text: str, max_tokens: int) -> str:
        return self._owner.text.truncate(text, max_tokens)

    def allowed_mass(self, answer: str, grammar: str) -> float:
        raise NotImplementedError("the reference answers unconstrained requests only")

    def constrain(self, grammar: str | None) -> None:
        if grammar is not None:
            raise NotImplementedError("the reference answers unconstrained requests only")

    def stats(self) -> SessionStats:
        return SessionStats(self._forward_passes, self._tokens_processed)

    def close(self) -> None:
        pass


def reference_nudge(
    base: ReferenceModel,
    nudging: ReferenceModel,
    base_prompt: str,
    nudging_prompt: str,
    config: NudgingConfig,
    markers: Sequence[str] = (),
) -> NudgingRun:
    """Run the algorithm over uncached sessions to the end; the finished run (``.text``,
    ``.finish_reason``). ``markers``: the base transcript's turn markers."""
    run = NudgingRun(
        base.session(base_prompt, config.base_sampling),
        nudging.session(nudging_prompt, config.nudging_sampling),
        config,
        markers,
    )
    for _ in run:
        pass
    return run
