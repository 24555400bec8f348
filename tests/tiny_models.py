"""Tiny real tokenizers and random-weight causal LMs, built in-process (no downloads).

* Tokenizer "A" (``byte_tokenizer``): a GPT-2/Llama-3 style byte-level BPE. Characters outside
  its merges are split over several byte tokens; it adds ``<|begin_of_text|>``; no chat template.
* Tokenizer "B" (``sp_tokenizer``): a SentencePiece/Llama-2 style Metaspace BPE with byte
  fallback (``<0xC3>`` ...), ``<s>`` BOS, a decoder that strips the leading space, ChatML special
  tokens and a ChatML chat template.
* Models: a 2-layer Llama and a 2-layer Gemma 3 whose first layer is a sliding-window layer
  (window ``GEMMA_WINDOW`` tokens), fp32, seeded. Random heads give nearly uniform
  next-token distributions, so the output head is scaled by ``HEAD_SCALE``: top-1
  probabilities then spread over roughly 0.2-1.0, and a gamma near 0.4 splits the tokens.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from langchain_nudging.models import LoadedModel

HEAD_SCALE = 30.0
WORD_BIAS = 3.0
GEMMA_WINDOW = 64
CONTEXT_WINDOW = 2048

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "You are a helpful assistant. Answer the question by walking through the reasoning steps.",
    "Instruction: Write a short poem about the sea and the sky.",
    "First, we add two and three to get five. Then we multiply by four.",
    "Café, naïve, façade, über, São Paulo, Zürich, smörgåsbord, piñata.",
    "日本語のテキスト、東京、こんにちは世界。",
    "Привет, как дела? Всё хорошо, спасибо.",
    "Emoji: 🙂 🚀 ✨ — “quotes” and ‘apostrophes’ … €5 and £3.",
    "Let me think step by step. The answer is 42, because 6 times 7 is 42.",
    "In 1969, people walked on the Moon for the first time.",
    "Python code: def add(a, b): return a + b  # adds numbers",
] * 3

CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny template default.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BYTE_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")
SP_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>")
SP_EXTRA_CHARS = "éü日本"


def _with_bos(tok: Tokenizer, bos: str) -> None:
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
    )


def train_byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=list(BYTE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    _with_bos(tok, "<|begin_of_text|>")
    return tok


def train_sp_bpe() -> Tokenizer:
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.pre_tokenizer = metaspace
    # Train on ASCII plus a few chosen characters: every other character goes to byte fallback.
    # (``limit_alphabet`` would pick among equally frequent characters at random.)
    kept = set(SP_EXTRA_CHARS)
    text = ["".join(ch for ch in line if ch.isascii() or ch in kept) for line in CORPUS]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=list(SP_SPECIALS),
        initial_alphabet=list(SP_EXTRA_CHARS),
        show_progress=False,
    )
    draft.train_from_iterator(text, trainer)
    # The trainer knows nothing of byte fallback: add the 256 byte tokens by hand.
    state = json.loads(draft.to_str())["model"]
    vocab: dict[str, int] = state["vocab"]
    size = len(vocab)
    vocab.update({f"<0x{b:02X}>": size + b for b in range(256)})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.add_special_tokens(list(SP_SPECIALS))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    _with_bos(tok, "<s>")
    return tok


def tokenizer_maker() -> Callable[..., PreTrainedTokenizerFast]:
    """``make_tokenizer("byte" | "sp", chat_template=...)``: a fresh wrapper (safe to modify).

    ``chat_template`` defaults to none for "byte" and to ChatML for "sp"; pass ``None`` for none.
    """
    backends = {"byte": train_byte_bpe(), "sp": train_sp_bpe()}
    unset = object()

    def make(kind: str, chat_template: Any = unset) -> PreTrainedTokenizerFast:
        if kind == "byte":
            tok = PreTrainedTokenizerFast(
                tokenizer_object=backends["byte"],
                bos_token="<|begin_of_text|>",
                eos_token="<|end_of_text|>",
                pad_token="<|pad|>",
            )
            default = None
        else:
            tok = PreTrainedTokenizerFast(
                tokenizer_object=backends["sp"],
                bos_token="<s>",
                eos_token="</s>",
                pad_token="<pad>",
                unk_token="<unk>",
                additional_special_tokens=["<|im_start|>", "<|im_end|>"],
            )
            default = CHATML_TEMPLATE
        tok.chat_template = default if chat_template is unset else chat_template
        return tok

    return make


def _ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_llama(tokenizer: Any, seed: int = 0, name: str = "tiny-llama") -> LoadedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT_WINDOW,
        tie_word_embeddings=False,
        **_ids(tokenizer),
    )
    return _finish(LlamaForCausalLM(config), tokenizer, name)


def build_gemma(tokenizer: Any, seed: int = 1, name: str = "tiny-gemma3") -> LoadedModel:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=CONTEXT_WINDOW,
        sliding_window=GEMMA_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=False,
        **_ids(tokenizer),
    )
    return _finish(Gemma3ForCausalLM(config), tokenizer, name)


def _word_bias(tokenizer: Any) -> torch.Tensor:
    """Favour whole words after a space and disfavour bare bytes, so that random models write
    space-separated words (the nudging loop splits drafts on spaces)."""
    bias = torch.zeros(len(tokenizer))
    for piece, index in tokenizer.get_vocab().items():
        body = piece[1:] if piece[:1] in ("Ġ", "▁") else ""
        if body.isascii() and body.isalpha():
            bias[index] = WORD_BIAS
        elif piece.startswith("<0x") or not (piece.isascii() or piece.isalpha()):
            bias[index] = -WORD_BIAS
    return bias


def _finish(model: Any, tokenizer: Any, name: str) -> LoadedModel:
    model.eval()
    model.requires_grad_(False)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = torch.nn.Parameter(old.weight.detach() * HEAD_SCALE, requires_grad=False)
    head.bias = torch.nn.Parameter(_word_bias(tokenizer), requires_grad=False)
    model.set_output_embeddings(head)
    return LoadedModel(model, tokenizer, name, CONTEXT_WINDOW)


@contextlib.contextmanager
def force_next(loaded: LoadedModel, script: Mapping[int, int]) -> Iterator[None]:
    """Make the model all but certain of ``script[last_id]`` after ``last_id`` (a bigram script).

    Works for any caller (cached sessions, full forwards, ``model.generate``): a pre-hook
    records the ids of each forward, a hook on the output head adds a large logit to the
    scripted next token at every position it returns.
    """
    model = loaded.model
    seen: dict[str, torch.Tensor] = {}

    def record(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        seen["ids"] = ids if ids is not None else args[0]

    def bias(_module: Any, _args: tuple, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        last_ids = seen["ids"][0, -logits.shape[1] :].tolist()
        for pos, last in enumerate(last_ids):
            if last in script:
                logits[0, pos, script[last]] += 60.0
        return logits

    handles = [
        model.register_forward_pre_hook(record, with_kwargs=True),
        model.get_output_embeddings().register_forward_hook(bias),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# -- a tiny pair and an engine over it, shared by the engine tests ----------------------------


def cache_hub_repo(cache: Path, repo_id: str, files: Path, only: set[str] | None = None) -> None:
    """`files`' contents as the cached `main` snapshot of `repo_id` (the cache's layout)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files.iterdir():
        if only is None or file.name in only:
            (snapshot / file.name).write_bytes(file.read_bytes())
