"""GGUF f16 -> any llama.cpp file type, through libllama's llama_model_quantize."""
from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from pathlib import Path

from ...errors import BuildError
from ...process import physical_cores
from ...recipes import GGUF_QUANTS


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None,
             progress: Callable[[int], None] | None = None) -> None:
    """Quantize src (a f16/bf16/f32 GGUF) to dst as `quant` (a lower-case llama.cpp file type name)."""
    try:
        import llama_cpp
    except ImportError:
        raise BuildError("quantizing needs llama-cpp-python: run 'make setup' or pip install -e '.[gguf]'") from None
    from .runner import route_llama_logs
    route_llama_logs()   # a line per tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(GGUF_QUANTS[quant])
    params.nthread = threads or physical_cores()
    llama_cpp.llama_backend_init()
    done = threading.Event()

    def watch():  # libllama writes the output as it goes; its growth is our progress
        last = 0
        while not done.wait(0.25):
            size = dst.stat().st_size if dst.exists() else 0
            if progress and size > last:
                progress(size - last)
                last = size

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        # ctypes releases the GIL for the call, so the watcher keeps running.
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    finally:
        done.set()
        t.join()
    if rc != 0 or not dst.exists():
        from .runner import last_llama_error
        raise BuildError(f"llama.cpp's quantizer failed for {quant}: {last_llama_error() or f'code {rc}'}")
