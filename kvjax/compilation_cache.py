"""A persistent XLA compilation cache, so that a second run does not compile again.

Compiling a method's decode loop takes seconds to tens of seconds on a CPU (the `make demo`
methods: 7-23 s each); JAX can keep the compiled executables on disk and load them in a
later process. The `kvjax` command line turns this on before it runs anything; scripts and
other JAX projects call `enable_compilation_cache()` themselves (a library must not change
a process-wide JAX setting on import).

Entries live in `<kvjax cache dir>/xla` (`$KVJAX_CACHE_DIR`, default `~/.cache/kvjax`), are
keyed by JAX on the program, the compile options, the backend and the jax/jaxlib versions,
and are evicted least-recently-used beyond `max_bytes`. `KVJAX_COMPILATION_CACHE=off`
turns the cache off; a directory there puts it elsewhere. An entry cut short (a process
killed while writing it) makes JAX warn "Error reading persistent compilation cache entry"
and compile again on every run, as it never overwrites an entry: delete the directory.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax

from kvjax.compat import set_compilation_cache

ENV_VAR = "KVJAX_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")
DEFAULT_MAX_BYTES = 2 * 2**30


def default_directory() -> Path | None:
    """Where the cache goes: `$KVJAX_COMPILATION_CACHE` (None when it says off), else
    `<kvjax cache dir>/xla`."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF:
        return None
    if value:
        return Path(value).expanduser()
    from models.checkpoint import cache_root  # orbax: imported only when the default is needed

    return cache_root() / "xla"


def enable_compilation_cache(
    directory: str | Path | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_compile_s: float | None = None,
) -> Path | None:
    """Store compiled executables in `directory` and reuse them across processes. Returns the
    directory in use, or None when the cache stays off.

    Without `directory`: a directory already set through JAX (`JAX_COMPILATION_CACHE_DIR`)
    is kept, else `default_directory()` (which `KVJAX_COMPILATION_CACHE=off` turns off).

    Only programs that took at least `min_compile_s` to compile are stored (None: JAX's
    `jax_persistent_cache_min_compile_time_secs`, 1 s unless set): small helper programs
    would cost a file each and load no faster than they compile.

    Call it before the first compilation of the process: JAX decides once whether a process
    uses the cache. A directory that cannot be created leaves the cache off with a warning,
    never an error: the cache only saves time.
    """
    if max_bytes < -1:
        raise ValueError(f"max_bytes must be -1 (no limit) or >= 0, got {max_bytes}")
    if min_compile_s is None:
        min_compile_s = jax.config.jax_persistent_cache_min_compile_time_secs
    if min_compile_s < 0:
        raise ValueError(f"min_compile_s must be >= 0, got {min_compile_s}")
    if directory is not None:
        target = Path(directory).expanduser()
    elif jax.config.jax_compilation_cache_dir:
        target = Path(jax.config.jax_compilation_cache_dir)
    else:
        target = default_directory()
        if target is None:
            return None
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"kvjax: compilation cache off, cannot create {target}: {e}", file=sys.stderr)
        return None
    set_compilation_cache(target, max_bytes=max_bytes, min_compile_s=min_compile_s)
    return target
