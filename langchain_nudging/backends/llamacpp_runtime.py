"""llama.cpp servers this process runs itself, on loopback, for GGUF models.

``runtime="llamacpp"`` (``NudgingPair.load``, ``NudgedChatModel``, ``nudging chat
--runtime llamacpp``) serves a bundled model or a ``.gguf`` file on a llama.cpp server started
here: llama.cpp's own HTTP server from the ``xllamacpp`` wheel, in a child process (so that it
can be stopped), on 127.0.0.1 at a free port. A server is started once per GGUF file and kept
until the process exits; the child also exits when this process dies (its stdin closes).

The servers are started for exact, batch-independent answers: ``n_ubatch = 2`` (llama.cpp's
CPU kernels compute a batch of 4 or more tokens in another order, so logits would depend on
how many tokens a call reads: up to 0.1 in log-probability on the bundled Gemma, measured;
docs/servers.md) and ``swa_full`` (Gemma's sliding-window cache otherwise cannot be cut back,
so a slot would re-read the whole prompt after every rejected token).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .http import ChildServer

START_TIMEOUT = 120.0  # seconds a server may take to load its model
SLOT_CONTEXT = 4096  # tokens per slot
PARALLEL = 4  # slots per server


@dataclass(frozen=True)
class ServerSettings:
    """How a server is started (the defaults suit the bundled pair on a small CPU)."""

    parallel: int = PARALLEL
    slot_context: int = SLOT_CONTEXT
    threads: int = 0  # 0: half the cores (two servers share the machine), at least 1
    ubatch: int = 2
    #: Host memory for llama.cpp's prompt cache (slot states kept for later requests that
    #: start the same way); ``None``: the server's default, 0: none (benchmarks read cold).
    cache_ram_mib: int | None = None


class LlamaCppServer(ChildServer):
    """One llama.cpp server in a child process: :attr:`url` once started; :meth:`stop`."""

    def __init__(self, gguf: str | os.PathLike[str], settings: ServerSettings | None = None):
        self.gguf = str(Path(gguf).resolve())
        super().__init__(f"the llama.cpp server for {self.gguf}")
        self.settings = settings or ServerSettings()
        threads = self.settings.threads or max(1, (os.cpu_count() or 2) // 2)
        config = {
            "gguf": self.gguf,
            "port": self.port,
            "parallel": self.settings.parallel,
            "n_ctx": self.settings.parallel * self.settings.slot_context,
            "threads": threads,
            "ubatch": self.settings.ubatch,
            "cache_ram_mib": self.settings.cache_ram_mib,
        }
        # A script, not a module of the package: the child imports only xllamacpp. It exits
        # when its stdin (a pipe this process holds) closes.
        self.start([sys.executable, str(_CHILD), json.dumps(config)], stdin=subprocess.PIPE)
        self.wait_ready(START_TIMEOUT)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)


_CHILD = Path(__file__).with_name("_llamacpp_child.py")
_SERVERS: dict[str, LlamaCppServer] = {}
_LOCK = threading.Lock()


def gguf_of(spec: Any) -> Path:
    """The GGUF file a spec names: a bundled id's own file, or a ``.gguf`` path."""
    from ..models.bundled import bundled_gguf
    from ..models.registry import BUNDLED_BASE_ID, BUNDLED_NUDGING_ID

    if isinstance(spec, str) and spec in (BUNDLED_BASE_ID, BUNDLED_NUDGING_ID):
        return bundled_gguf(spec)
    if isinstance(spec, str | os.PathLike) and str(spec).endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"runtime='llamacpp': no GGUF file at {path}")
        return path
    raise ValueError(
        f"runtime='llamacpp' serves a bundled id or a .gguf file; got {spec!r} (start a "
        "llama.cpp server for other models and give its URL)"
    )


def serve_gguf(spec: Any, start: bool = True) -> str | None:
    """The URL of this process's llama.cpp server for ``spec``'s GGUF file; started on first
    use when ``start`` (else ``None`` until it is)."""
    gguf = str(gguf_of(spec).resolve())
    with _LOCK:
        server = _SERVERS.get(gguf)
        if server is not None and server.running:
            return server.url
        if not start:
            return None
        server = _SERVERS[gguf] = LlamaCppServer(gguf)
        return server.url


def stop_servers() -> None:
    """Stop every server this process started (also done at exit)."""
    with _LOCK:
        servers = list(_SERVERS.values())
        _SERVERS.clear()
    for server in servers:
        server.stop()


atexit.register(stop_servers)
