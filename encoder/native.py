"""C++ kernels built on the machine that runs them: `load_extension` compiles a source under
``csrc/`` once with ``torch.utils.cpp_extension`` and loads it (the scan kernel, the LLM's packed
linear layer). Every kernel has a pure PyTorch reference beside it; a build that fails returns the
reason instead of raising, and the caller falls back or says so.

`release_thread_pool` is about the OpenMP runtime those kernels and torch's own operators share."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import sys
from pathlib import Path

import torch
from torch.utils import cpp_extension

log = logging.getLogger(__name__)

_LOADED: dict[Path, tuple[object | None, str | None]] = {}
_WARNED: set[tuple[Path, str]] = set()


def load_extension(src: Path, prefix: str, what: str):
    """(module, None) or (None, why) for the C++ file ``src``; the first build logs ``what`` (e.g.
    "the CPU scan kernel … about 40 s") once; later calls and later processes reuse the build."""
    src = Path(src)
    if src in _LOADED:
        return _LOADED[src]
    # -march=native: the kernel is built on the machine that runs it, so its SIMD vectors use the
    # widest registers there. Threads come from at::parallel_for.
    cflags = ["-O3", "-march=native", "-ffp-contract=fast"]
    # at::parallel_for is inline OpenMP in torch's headers: without -fopenmp the pragma is dropped
    # and the kernel runs on one thread.
    ldflags = []
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    # Name and build folder follow the source, the flags and the torch install (its headers and
    # paths go into the build), and the build compiles a copy of the source kept in that folder:
    # checkouts sharing a venv share one build, and different kernels or venvs never rebuild over
    # each other.
    code = src.read_bytes()
    key = f"{' '.join(cflags + ldflags)}|{torch.__version__}|{Path(torch.__file__).resolve()}".encode()
    name = f"{prefix}_{hashlib.sha256(code + key).hexdigest()[:12]}"
    build_dir = Path(cpp_extension.get_default_build_root()) / name
    if not any(build_dir.glob(f"{name}*.so")):
        log.warning("building %s once (later runs reuse it) …", what)
    try:
        os.makedirs(build_dir, exist_ok=True)
        local_src = build_dir / src.name
        if not local_src.is_file() or local_src.read_bytes() != code:
            tmp = build_dir / f".{src.name}.{os.getpid()}"
            tmp.write_bytes(code)
            os.replace(tmp, local_src)
        result = cpp_extension.load(name=name, sources=[str(local_src)], extra_cflags=cflags,
                                    extra_ldflags=ldflags, build_directory=str(build_dir), verbose=False), None
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja, no headers …
        lines = str(err).strip().splitlines()
        result = None, f"{type(err).__name__}: {lines[-1] if lines else ''}"
    _LOADED[src] = result
    return result


def load_kernel(src: Path, prefix: str, what: str, missing: str):
    """The module `load_extension` builds, or None with a warning logged once per kernel and reason:
    `missing` with ``{why}`` filled in (what the caller does instead)."""
    ext, why = load_extension(src, prefix, what)
    if ext is None and (Path(src), why) not in _WARNED:
        _WARNED.add((Path(src), why))
        log.warning(missing.format(why=why))
    return ext


def _openmp():
    """torch's OpenMP runtime if it is GNU's libgomp and already loaded, else None."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        gomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        gomp.omp_pause_resource_all.argtypes = [ctypes.c_int]
        return gomp
    except (OSError, AttributeError):  # another runtime (Intel's, LLVM's) or a libgomp before OpenMP 5.0
        return None


_GOMP = _openmp()


def release_thread_pool() -> None:
    """Let the OpenMP worker threads of the calling thread exit, before another thread computes.

    libgomp gives every thread that starts a parallel region its own pool of workers, kept for the
    thread's life. Once the workers of all pools outnumber the cores, every worker stops spinning
    between regions and sleeps, so each region waits for its workers to be woken: a decoding step
    has hundreds of small regions. A chat answer runs in its own thread (the streamer is read in the
    caller's), and the caller has parallel regions behind it (loading the model, resizing frames),
    so without this the answer's thread computes with sleeping workers. The pool comes back at the
    caller's next parallel region. Nothing happens under other runtimes."""
    if _GOMP is not None:
        _GOMP.omp_pause_resource_all(1)  # omp_pause_soft: threads exit, nothing else is reset
