"""Python-side cost per answer token, as the prompt and the answer grow.

The bundled pair's tokenizers drive two tiny random-weight models of the same vocabularies
(2 layers, width 64): their forward passes take a millisecond or two, so what is measured is
the library's own work per token (tokenizing, the choice trie, the stop rules, statistics).
End-of-sequence tokens are masked and the repetition rules switched off, so every answer runs
to ``max_tokens``. The overhead is the wall time minus the time spent inside the models'
forward calls, per answer token; it is reported for a short and a long prompt and for a short
and a long answer, so growth with length shows as a ratio.

    python -m benchmarks.overhead                  # ~2 min
    python -m benchmarks.overhead --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from langchain_nudging import ChatMessage, NudgingConfig, NudgingPair, Request
from langchain_nudging.backends.local import LocalModel
from langchain_nudging.models import LoadedModel, load_model

from .measure import DATA_DIR

RUNS = [(50, 200), (50, 1000), (2000, 200), (2000, 1000)]  # (prompt tokens, answer tokens)


def tiny(real: LoadedModel, kind: str, seed: int) -> LoadedModel:
    """A random 2-layer model with ``real``'s tokenizer and vocabulary."""
    torch.manual_seed(seed)
    vocab = real.model.get_output_embeddings().weight.shape[0]
    common: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 8192,
    }
    if kind == "gemma":
        config = Gemma3TextConfig(**common, sliding_window=512, layer_types=None)
        model = Gemma3ForCausalLM(config)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.eval().requires_grad_(False)
    return LoadedModel(model, real.tokenizer, f"tiny-{kind}", 8192)


@contextmanager
def timed_forwards(models: list[Any]) -> Iterator[list[float]]:
    """Seconds spent in the models' forward calls; stop ids masked so answers never end."""
    spent = [0.0]
    handles = []
    for model in models:
        starts: list[float] = []
        stops = torch.tensor(sorted(model.stop_ids))

        def pre(_module: Any, _args: Any, starts: list[float] = starts) -> None:
            starts.append(time.perf_counter())

        def post(
            _module: Any, _args: Any, output: Any, starts: list[float] = starts, stops: Any = stops
        ) -> Any:
            output.logits[..., stops] = -1e9
            spent[0] += time.perf_counter() - starts.pop()
            return output

        handles.append(model.register_forward_pre_hook(pre))
        handles.append(model.register_forward_hook(post))
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def context(data: Path, tokens: int, tokenizer: Any) -> str:
    """Passages from just-eval-instruct up to about ``tokens`` tokens (a RAG-like prompt)."""
    text, lines = "", (data / "just_eval_instruct_1000.jsonl").open(encoding="utf-8")
    while len(tokenizer(text)["input_ids"]) < tokens:
        text += json.loads(next(lines))["instruction"] + "\n\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    real_base, real_nudging = (
        load_model("bundled:gemma-3-270m"),
        load_model("bundled:smollm2-135m-instruct"),
    )
    base, nudging = tiny(real_base, "gemma", 0), tiny(real_nudging, "llama", 1)
    models = LocalModel(base), LocalModel(nudging)
    pair = NudgingPair(*models)
    for model in models:
        model.model.stop_ids = model.text.stop_ids
    rows = []
    for prompt_tokens, answer_tokens in RUNS:
        question = "Answer from these notes.\n\n" + context(
            args.data, prompt_tokens, base.tokenizer
        )
        config = NudgingConfig(
            max_tokens=answer_tokens,
            max_rounds=10**6,
            loop_passage_words=10**6,
            repetition_stops=False,
        )
        with timed_forwards([base.model, nudging.model]) as spent:
            start = time.perf_counter()
            generation = pair.generate(Request([ChatMessage("user", question)], config))
            for _ in generation:
                pass
            wall = time.perf_counter() - start
        written = generation.stats.base_tokens + generation.stats.nudge_tokens
        row = {
            "prompt_tokens": generation.stats.prompt_tokens,
            "answer_tokens": written,
            "wall_s": round(wall, 3),
            "forward_s": round(spent[0], 3),
            "overhead_ms_per_token": round(1000 * (wall - spent[0]) / max(1, written), 3),
            "finish_reason": generation.stats.finish_reason,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {(r["prompt_tokens"] > 1000, r["answer_tokens"] > 500): r for r in rows}
    if (False, False) not in by or (True, True) not in by:
        return
    growth = by[(True, True)]["overhead_ms_per_token"] / by[(False, False)]["overhead_ms_per_token"]
    print(f"overhead per token, long prompt + long answer / short + short: {growth:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "growth": growth}, indent=2))


if __name__ == "__main__":
    main()
