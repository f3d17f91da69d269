"""Compile the C++ kernel with the system's g++ at first use and cache the shared library.

The library is built with ``-march=native`` for the machine that runs it, so the cache key
holds the source, the compiler, the jaxlib version (its FFI headers) and the CPU's feature
flags. The cache is ``$MISTRALRS_JAX_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mistralrs-jax/kernels``,
else ``~/.cache/mistralrs-jax/kernels``. Builds go to a temporary file that is renamed into
place, so processes that build at the same time do not see half-written libraries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("qmatmul.cc", "unpack.h", "activations.h", "gemv.h", "attention.h", "threads.h")
# Extra -m flags for tests that build the portable paths on a machine with more features.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "native": ("-march=native",),
    "avx2": ("-march=haswell",),
    "avx2+avxvnni": ("-march=haswell", "-mavxvnni"),
}
COMPILE_TIMEOUT_S = 300


class KernelBuildError(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    explicit = os.environ.get("MISTRALRS_JAX_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mistralrs-jax" / "kernels"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelBuildError("no C++ compiler found (install g++ or set CXX)")
    return cxx


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run the C++ compiler {cxx!r}: {e}") from e
    return out.stdout.splitlines()[0] if out.stdout else cxx


def library_path(isa: str = "native") -> Path:
    """Build (once) and return the shared library for `isa` ("native", "avx2", "avx2+avxvnni")."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise KernelBuildError(f"the kernel is written for x86-64 with AVX2; this machine is {platform.machine()}")
    flags = cpu_flags()
    if "avx2" not in flags or "fma" not in flags:
        raise KernelBuildError("this CPU has no AVX2/FMA (the kernel's minimum)")
    if isa not in ISA_FLAGS:
        raise KernelBuildError(f"unknown kernel ISA {isa!r}; known: {sorted(ISA_FLAGS)}")
    import jax
    import jaxlib

    cxx = compiler()
    include = jax.ffi.include_dir()
    cmd_flags = ["-O3", "-std=c++17", "-shared", "-fPIC", *ISA_FLAGS[isa], "-isystem", include]
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (_compiler_version(cxx), jaxlib.__version__, " ".join(cmd_flags[:-2]), " ".join(sorted(flags))):
        digest.update(part.encode())
    out_dir = cache_dir()
    target = out_dir / f"mj_qmatmul-{isa.replace('+', '_')}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelBuildError(f"cannot create the kernel cache {out_dir}: {e}") from e
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [cxx, *cmd_flags, str(SOURCE_DIR / "qmatmul.cc"), "-o", tmp]
    log.info("building the CPU quantized-matmul kernel: %s", " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise KernelBuildError(f"the kernel compile failed to run: {e}") from e
    if res.returncode != 0:
        os.unlink(tmp)
        tail = "\n".join(res.stderr.strip().splitlines()[-8:])
        raise KernelBuildError(f"the kernel compile failed ({cxx}, exit {res.returncode}):\n{tail}")
    os.replace(tmp, target)
    return target
