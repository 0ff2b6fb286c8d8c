"""Where a result came from: machine, backend and library versions (for JSON results)."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from typing import Any

import jax

PACKAGES = ("jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "torch", "numpy", "gguf")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """A JSON-ready description of this run's machine and software."""
    devices = jax.devices()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d.device_kind) for d in devices],
        "versions": package_versions(),
    }
