"""Models on serving engines, reached over HTTP: the part every engine's dialect shares.

A server spec is a URL: ``http(s)://host:port`` is probed for what answers there (each dialect
says how it recognizes its engine); a prefix forces the dialect (``llamacpp+http://...``).
Query parameters are the dialect's, for this one model (``vllm+http://host:8000?tokenizer=X``).
:class:`ServerClient` is the one way a dialect talks to its server: JSON requests and
server-sent-event streams over one pooled ``httpx.Client``, every call bounded by a timeout,
connection failures and 5xx answers retried with exponential backoff up to ``max_retries``,
and an API key (``api_key``, else ``$LANGCHAIN_NUDGING_API_KEY``) sent as a bearer token. A
dialect is one module that calls :func:`register_dialect` once (backends/llamacpp.py).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from .base import ContextWindowError, TextModel

API_KEY_ENV = "LANGCHAIN_NUDGING_API_KEY"
DEFAULT_TIMEOUT = 60.0  # seconds a call may wait for the server (connect, or a read)
DEFAULT_RETRIES = 2
SERVER_OPTIONS = frozenset({"api_key", "timeout", "max_retries", "slot_wait"})
_C = TypeVar("_C", bound=tuple[Any, ...])
_BACKOFF = 0.25  # seconds before the first retry; doubled per retry, with jitter, capped
_MAX_BACKOFF = 4.0


class ServerError(RuntimeError):
    """A serving engine failed a call, could not be reached, or is not what it was taken for;
    the message names the server's URL."""


@dataclass(frozen=True)
class ServerSpec:
    """A parsed server spec: the dialect it forces (``None``: probe), the base URL, and the
    query parameters for the dialect."""

    dialect: str | None
    url: str
    params: tuple[tuple[str, str], ...] = ()


def parse_server(spec: Any) -> ServerSpec | None:
    """``spec`` as a server spec, or ``None`` when it is not a URL of one."""
    if not isinstance(spec, str):
        return None
    text = spec.strip()
    dialect, sep, rest = text.partition("+")
    if sep and rest.startswith(("http://", "https://")) and dialect.isidentifier():
        text = rest
    else:
        dialect = ""
    if not text.startswith(("http://", "https://")):
        return None
    url = httpx.URL(text)
    if not url.host:
        return None
    base = str(url.copy_with(path="/", query=None)).rstrip("/")
    return ServerSpec(dialect or None, base, tuple(url.params.multi_items()))


@dataclass(frozen=True)
class _Dialect:
    name: str
    recognizes: Callable[[ServerClient], bool]
    build: Callable[..., TextModel]


_DIALECTS: dict[str, _Dialect] = {}


def register_dialect(
    name: str, recognizes: Callable[[ServerClient], bool], build: Callable[..., TextModel]
) -> None:
    """Add a serving engine's dialect: ``recognizes(client)`` probes a server (no exception
    for a server of another kind); ``build(client, params, **options)`` makes its text model
    (``params``: the spec's query parameters; a dialect refuses those it does not know)."""
    _DIALECTS[name] = _Dialect(name, recognizes, build)


def dialects() -> tuple[str, ...]:
    return tuple(_DIALECTS)


def server_model(spec: str, **options: Any) -> TextModel:
    """The text model of a server URL (see the module's docstring); raises
    :class:`ServerError` naming the URL when it cannot be reached or nothing known answers."""
    parsed = parse_server(spec)
    if parsed is None:
        raise ValueError(f"not a server URL: {spec!r}")
    unknown = set(options) - SERVER_OPTIONS
    if unknown:
        raise ValueError(f"options {sorted(unknown)} do not apply to server models ({spec})")
    client = ServerClient(
        parsed.url,
        api_key=options.get("api_key"),
        timeout=options.get("timeout"),
        max_retries=options.get("max_retries"),
    )
    if parsed.dialect is not None:
        dialect = _DIALECTS.get(parsed.dialect)
        if dialect is None:
            raise ValueError(
                f"unknown server dialect {parsed.dialect!r} in {spec!r}; use one of "
                + ", ".join(f"{name}+http://..." for name in _DIALECTS)
            )
    else:
        client.check_reachable()
        dialect = next((d for d in _DIALECTS.values() if d.recognizes(client)), None)
        if dialect is None:
            client.close()
            raise ServerError(
                f"{parsed.url} answers, but not as a known serving engine ("
                + ", ".join(_DIALECTS)
                + "); give the dialect as a prefix, e.g. llamacpp+"
                + parsed.url
            )
    params = dict(parsed.params)
    if len(params) < len(parsed.params):
        raise ValueError(f"{spec!r}: a query parameter is given twice")
    return dialect.build(client, params, slot_wait=options.get("slot_wait"))


class ServerClient:
    """JSON calls to one server, bounded and retried (see the module's docstring)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.max_retries = DEFAULT_RETRIES if max_retries is None else int(max_retries)
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            trust_env=False,  # loopback and cluster servers: no proxies from the environment
            transport=transport,
        )
        self.calls = 0  # HTTP requests sent (retries included)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    def check_reachable(self) -> None:
        """Fail with a clear error, within the timeout, when nothing answers at the URL."""
        self.get("/health", retry=False, fail=False)

    def get(self, path: str, *, retry: bool = True, fail: bool = True) -> Any:
        return self._call("GET", path, None, retry, fail)

    def post(self, path: str, body: dict[str, Any], *, retry: bool = True) -> Any:
        return self._call("POST", path, body, retry, True)

    def _count(self) -> None:
        with self._lock:
            self.calls += 1

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None, retry: bool, fail: bool
    ) -> Any:
        for attempt in self._attempts(retry):
            self._count()
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as exc:
                if attempt.last:
                    raise self._unreachable(path, exc) from exc
                continue
            if response.status_code >= 500 and not attempt.last:
                continue
            if fail:
                self._check(response, path)
            try:
                return response.json()
            except ValueError:
                return None
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def stream(self, path: str, body: dict[str, Any]) -> Iterator[Iterator[dict[str, Any]]]:
        """The events of a server-sent-event stream, as JSON objects; leaving the block closes
        the connection (the server stops generating). A failure before the first event is
        retried; one after it is the caller's (the tokens so far are already used)."""
        for attempt in self._attempts(True):
            self._count()
            request = self._http.build_request("POST", path, json=body)
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt.last:
                    raise self._unreachable(path, exc) from exc
                continue
            if response.status_code >= 500 and not attempt.last:
                response.close()
                continue
            try:
                if response.status_code >= 400:
                    response.read()
                    self._check(response, path)
                yield self._events(response, path)
            finally:
                response.close()
            return

    def _events(self, response: httpx.Response, path: str) -> Iterator[dict[str, Any]]:
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if isinstance(event, dict) and "error" in event:
                    raise self._error(path, event["error"], response.status_code)
                yield event
        except httpx.TransportError as exc:
            raise ServerError(
                f"{self.url}{path}: the connection failed mid-answer ({type(exc).__name__}: "
                f"{exc}); the server may have stopped"
            ) from exc

    def _attempts(self, retry: bool) -> Iterator[_Attempt]:
        tries = 1 + (self.max_retries if retry else 0)
        for n in range(tries):
            if n:
                delay = min(_MAX_BACKOFF, _BACKOFF * 2 ** (n - 1))
                time.sleep(delay * (0.5 + random.random() / 2))
            yield _Attempt(n == tries - 1)

    def _unreachable(self, path: str, exc: Exception) -> ServerError:
        return ServerError(
            f"cannot reach the server at {self.url} ({path}: {type(exc).__name__}: {exc}); "
            f"waited up to {self.timeout:g} s per try, {1 + self.max_retries} tries"
        )

    def _check(self, response: httpx.Response, path: str) -> None:
        if response.status_code < 400:
            return
        try:
            detail: Any = response.json()
        except ValueError:
            detail = response.text[:300]
        if isinstance(detail, dict) and "error" in detail:
            detail = detail["error"]
        raise self._error(path, detail, response.status_code)

    def _error(self, path: str, detail: Any, status: int) -> Exception:
        message = detail.get("message", detail) if isinstance(detail, dict) else detail
        kind = detail.get("type", "") if isinstance(detail, dict) else ""
        if kind == "exceed_context_size_error" or any(
            phrase in str(message) for phrase in ("context size", "context length")
        ):
            return ContextWindowError(f"{self.url}: {message}")
        if status in (401, 403):
            return ServerError(
                f"{self.url}{path}: HTTP {status} ({message}); give the server's key as "
                f"api_key or ${API_KEY_ENV}"
            )
        return ServerError(f"{self.url}{path}: HTTP {status}: {message}")


@dataclass(frozen=True)
class _Attempt:
    last: bool


def resumed(
    stream: Callable[[list[int], int], Iterator[_C]], ids: list[int], size: int, retries: int
) -> Iterator[_C]:
    """``stream(ids, size)``'s choices (each a tuple whose first item is a token id), asked
    again from the last token read when the connection is lost mid-stream (a
    :class:`ServerError`), up to ``retries`` times."""
    ids = list(ids)
    while size > 0:
        try:
            for choice in stream(list(ids), size):
                ids.append(choice[0])
                size -= 1
                yield choice
            return
        except ServerError:
            if retries <= 0:
                raise
            retries -= 1


def check_params(url: str, params: Mapping[str, str], known: AbstractSet[str]) -> None:
    """Refuse query parameters a dialect does not take, naming the ones it does."""
    unknown = sorted(set(params) - set(known))
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise ValueError(f"{url}: unknown server parameters {unknown} (this engine takes: {takes})")


def is_server(spec: Any) -> bool:
    """Whether ``spec`` is a server URL (the factory's claim for server models)."""
    return parse_server(spec) is not None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server this process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerStartError(ServerError):
    """A server this process runs itself did not start."""


class ChildServer:
    """A server this process runs in a child process, on 127.0.0.1 at :attr:`port` (a
    runtime's: llamacpp_runtime.py, vllm_runtime.py). Its output goes to a temporary log file
    (a pipe nobody reads would fill and stop the server); :meth:`wait_ready` returns once
    ``/health`` answers; :meth:`stop` ends it."""

    def __init__(self, what: str) -> None:
        self.what = what  # "the llama.cpp server for X", for messages
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open for the server's life
            prefix="server-", suffix=".log", delete=False
        )
        self._process: subprocess.Popen[bytes] | None = None

    def start(
        self, command: Sequence[str], env: Mapping[str, str] | None = None, stdin: Any = None
    ) -> None:
        self._process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, "start() first"
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 800) -> str:
        """The end of the server's log."""
        return Path(self.log.name).read_text(errors="replace")[-chars:].strip()

    def wait_ready(self, timeout: float) -> None:
        """Return once ``/health`` answers 200; raise :class:`ServerStartError` with the end of
        the log when the server exits or does not answer within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.what} exited at start (code {self.process.returncode}): "
                    f"{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0, trust_env=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise ServerStartError(f"{self.what} did not answer within {timeout:g} s: {tail}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if process is not None and process.stdin is not None:
            process.stdin.close()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
