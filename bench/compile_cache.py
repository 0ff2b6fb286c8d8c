"""`make demo` in fresh processes: how much compiling costs, and what saves it.

`--compare cache` (default): without and with the persistent compilation cache. Each round
makes an empty cache directory and runs `kvjax demo --json` twice in new processes with
`KVJAX_COMPILATION_CACHE` pointing there: cold (every program compiles and is stored), then
warm (the programs load from the cache).

`--compare threads`: the methods' programs compiled one at a time
(`KVJAX_COMPILE_THREADS=1`) against side by side (`kvjax.generation.compiled_together`, one
thread per core), with the persistent cache off; the two runs alternate which goes first.

Reported per run: the process's wall time and each method's `compile_s` (the shared prefill
program plus the method's conversion and decode programs, lowering included, as the demo
prints it: the prefill is in every method's figure). Ratios are first side / second side
within a round, medians over rounds. The converted model weights are cached separately
(`models.load`) and are warm in every run after the first.

Run from the repository root:

    .venv/bin/python -m bench.compile_cache --rounds 3
    .venv/bin/python -m bench.compile_cache --compare threads --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.method_speed import save_result
from kvjax.cli import positive_int

REPO = Path(__file__).resolve().parent.parent


def run_demo(tokens: int, **env_vars: str) -> dict[str, Any]:
    """One `kvjax demo --json` process with `env_vars` set: wall seconds and per-method stats."""
    env = {**os.environ, **env_vars}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kvjax.cli", "demo", "--json", "--tokens", str(tokens)],
                         capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"kvjax demo failed ({out.returncode}):\n{out.stderr[-3000:]}")
    demo = json.loads(out.stdout)
    return {
        "wall_s": wall,
        "compile_s": {m["method"]: m["stats"]["compile_s"] for m in demo["methods"]},
        "correct": {m["method"]: m["correct"] for m in demo["methods"]},
    }


def run_cache_round(tokens: int) -> dict[str, Any]:
    """Cold then warm demo runs on a new, empty cache directory."""
    with tempfile.TemporaryDirectory(prefix="kvjax-xla-") as tmp:
        cache = Path(tmp)
        runs = {}
        for side in ("cold", "warm"):
            runs[side] = run_demo(tokens, KVJAX_COMPILATION_CACHE=str(cache))
            runs[side]["cache_files"] = len(list(cache.glob("*-cache")))
            runs[side]["cache_bytes"] = sum(f.stat().st_size for f in cache.glob("*-cache"))
    return runs


def run_threads_round(tokens: int, index: int) -> dict[str, Any]:
    """Demo runs compiling one program at a time and side by side, cache off; round `index`
    decides which goes first (a slow spell then does not always hit the same side)."""
    threads = {"one_thread": "1", "side_by_side": ""}  # "": one per core
    order = list(threads) if index % 2 == 0 else list(threads)[::-1]
    runs = {side: run_demo(tokens, KVJAX_COMPILATION_CACHE="off", KVJAX_COMPILE_THREADS=threads[side])
            for side in order}
    return {side: runs[side] for side in threads}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round first / second side ratios (medians) and the median seconds of each side
    (the sides are the keys of a round: "cold", "warm" or "one_thread", "side_by_side")."""
    med = lambda xs: statistics.median(xs)
    total = lambda run: sum(run["compile_s"].values())
    first, second = sides = tuple(rounds[0])
    methods = list(rounds[0][first]["compile_s"])
    return {
        "wall_s": {side: med([r[side]["wall_s"] for r in rounds]) for side in sides},
        "compile_s": {side: {m: med([r[side]["compile_s"][m] for r in rounds]) for m in methods} for side in sides},
        f"{first}_over_{second}": {
            "wall": med([r[first]["wall_s"] / r[second]["wall_s"] for r in rounds]),
            "compile": med([total(r[first]) / total(r[second]) for r in rounds]),
            **{m: med([r[first]["compile_s"][m] / r[second]["compile_s"][m] for r in rounds]) for m in methods},
        },
    }


def markdown_table(summary: dict[str, Any]) -> str:
    first, second = summary["compile_s"]
    ratio = summary[f"{first}_over_{second}"]
    methods = list(summary["compile_s"][first])
    lines = ["| | " + " | ".join(methods) + " | wall |", "|---|" + "---:|" * (len(methods) + 1)]
    for side in (first, second):
        lines.append(f"| compile s, {side.replace('_', ' ')} | "
                     + " | ".join(f"{summary['compile_s'][side][m]:.1f}" for m in methods)
                     + f" | {summary['wall_s'][side]:.1f} |")
    lines.append(f"| {first.replace('_', ' ')} / {second.replace('_', ' ')} | "
                 + " | ".join(f"{ratio[m]:.2f}x" for m in methods) + f" | {ratio['wall']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare", choices=("cache", "threads"), default="cache",
                   help="cache: cold vs warm persistent cache; threads: one compilation at a time vs side by side")
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--tokens", type=int, default=6000, help="demo prompt length")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = p.parse_args(argv)

    from kvjax.environment import environment

    env = environment()
    date = datetime.date.today().isoformat()
    name = "compile_cache" if args.compare == "cache" else "compile_threads"
    output = args.output or REPO / "bench" / "results" / f"{name}-{env['backend']}-{date}.json"
    settings = {"compare": args.compare, "rounds": args.rounds, "tokens": args.tokens, "cores": os.cpu_count()}
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        runs = run_cache_round(args.tokens) if args.compare == "cache" else run_threads_round(args.tokens, i)
        rounds.append(runs)
        print(f"round {i + 1}: " + "; ".join(
            f"{side}: wall {run['wall_s']:.1f} s, compile {sum(run['compile_s'].values()):.1f} s"
            for side, run in runs.items()), file=sys.stderr, flush=True)
        save_result(output, name, env, settings, rounds, {"summary": summarize(rounds)})
    print(markdown_table(summarize(rounds)))
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
