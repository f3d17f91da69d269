"""A description of the machine a benchmark ran on, written into every result file.

Unlike ``bench_engine.machine_description`` this never starts a JAX backend unless asked:
a load generator that talks to a server on the same GPU must not grab that GPU's memory
(JAX preallocates most of it when its GPU client starts). The backend of a *server* is
read from the server itself (``/v1/status``) by the serving benchmark instead.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

PACKAGES = ("mistralrs-jax", "jax", "jaxlib", "llama-cpp-python", "torch", "transformers")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity), which is what thread pools size from."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_machine(with_jax_backend: bool = False) -> dict[str, Any]:
    """CPU model, thread counts, OS, Python and package versions; the JAX backend only on request."""
    description: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": usable_cpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": package_version("jax"),
        "jax_backend": None,
        "versions": {name: package_version(name) for name in PACKAGES},
    }
    if with_jax_backend:
        import jax

        description["jax_backend"] = jax.default_backend()
        description["jax_devices"] = [str(device) for device in jax.devices()]
    return description


def one_line(description: dict[str, Any]) -> str:
    """The description as one human line (for plot footers and table captions)."""
    backend = description.get("jax_backend") or "backend not reported"
    return (f"{description.get('cpu_model', 'unknown CPU')}, {description.get('threads', '?')} threads, "
            f"JAX {description.get('jax') or 'not installed'} ({backend}), Python {description.get('python', '?')}")
