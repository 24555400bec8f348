"""The child process of a llama.cpp server of this process's own (llamacpp_runtime.py).

Run as a script (``python _llamacpp_child.py CONFIG``), so that it imports xllamacpp alone:
load the GGUF model, serve on loopback, exit when the parent closes the pipe or dies.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def serve(config: dict[str, Any]) -> None:
    """The child: load the model, serve on loopback, exit when the parent goes away."""
    import xllamacpp  # type: ignore[import-untyped]

    params = xllamacpp.CommonParams()
    params.model.path = config["gguf"]
    params.n_ctx = config["n_ctx"]
    params.n_parallel = config["parallel"]
    params.n_ubatch = config["ubatch"]
    params.cpuparams.n_threads = config["threads"]
    params.cpuparams_batch.n_threads = config["threads"]
    params.hostnames = ["127.0.0.1"]
    params.port = config["port"]
    params.warmup = False
    params.verbosity = 0  # errors and warnings only
    params.swa_full = True
    params.endpoint_metrics = True
    if config.get("cache_ram_mib") is not None:
        params.cache_ram_mib = config["cache_ram_mib"]
    server = xllamacpp.Server(params)  # returns once the model is loaded; serves in threads
    sys.stdin.read()  # until the parent closes the pipe or dies
    del server
    os._exit(0)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
