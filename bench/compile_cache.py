"""`make demo` in fresh processes, without and with the persistent compilation cache.

Each round makes an empty cache directory and runs `kvjax demo --json` twice in new
processes with `KVJAX_COMPILATION_CACHE` pointing there: cold (every program compiles and is
stored), then warm (the programs load from the cache). Reported per run: the process's wall
time and each method's `compile_s` (the shared prefill program plus the method's conversion
and decode programs, lowering included, as the demo prints it: the prefill is in every
method's figure). Ratios are cold / warm within a round, medians over
rounds. The converted model weights are cached separately (`models.load`) and are warm in
both runs after the first round's cold run.

Run from the repository root:

    .venv/bin/python -m bench.compile_cache --rounds 3
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


def run_demo(cache: Path, tokens: int) -> dict[str, Any]:
    """One `kvjax demo --json` process using `cache`: wall seconds and per-method stats."""
    env = {**os.environ, "KVJAX_COMPILATION_CACHE": str(cache)}
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
        "cache_files": len(list(cache.glob("*-cache"))),
        "cache_bytes": sum(f.stat().st_size for f in cache.glob("*-cache")),
    }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-round cold / warm ratios (medians) and the median seconds of each side."""
    med = lambda xs: statistics.median(xs)
    total = lambda run: sum(run["compile_s"].values())
    methods = list(rounds[0]["cold"]["compile_s"])
    return {
        "wall_s": {side: med([r[side]["wall_s"] for r in rounds]) for side in ("cold", "warm")},
        "compile_s": {side: {m: med([r[side]["compile_s"][m] for r in rounds]) for m in methods}
                      for side in ("cold", "warm")},
        "cold_over_warm": {
            "wall": med([r["cold"]["wall_s"] / r["warm"]["wall_s"] for r in rounds]),
            "compile": med([total(r["cold"]) / total(r["warm"]) for r in rounds]),
            **{m: med([r["cold"]["compile_s"][m] / r["warm"]["compile_s"][m] for r in rounds]) for m in methods},
        },
    }


def markdown_table(summary: dict[str, Any]) -> str:
    cold, warm, ratio = summary["compile_s"]["cold"], summary["compile_s"]["warm"], summary["cold_over_warm"]
    lines = ["| | " + " | ".join(cold) + " | wall |", "|---|" + "---:|" * (len(cold) + 1)]
    lines.append("| compile s, cold | " + " | ".join(f"{cold[m]:.1f}" for m in cold)
                 + f" | {summary['wall_s']['cold']:.1f} |")
    lines.append("| compile s, warm | " + " | ".join(f"{warm[m]:.1f}" for m in warm)
                 + f" | {summary['wall_s']['warm']:.1f} |")
    lines.append("| cold / warm | " + " | ".join(f"{ratio[m]:.2f}x" for m in cold) + f" | {ratio['wall']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--tokens", type=int, default=6000, help="demo prompt length")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = p.parse_args(argv)

    from kvjax.environment import environment

    env = environment()
    date = datetime.date.today().isoformat()
    output = args.output or REPO / "bench" / "results" / f"compile_cache-{env['backend']}-{date}.json"
    settings = {"rounds": args.rounds, "tokens": args.tokens}
    rounds: list[dict[str, Any]] = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="kvjax-xla-") as tmp:
            cache = Path(tmp)
            cold = run_demo(cache, args.tokens)
            warm = run_demo(cache, args.tokens)
        rounds.append({"cold": cold, "warm": warm})
        print(f"round {i + 1}: wall {cold['wall_s']:.1f} s cold, {warm['wall_s']:.1f} s warm; compile "
              f"{sum(cold['compile_s'].values()):.1f} s cold, {sum(warm['compile_s'].values()):.1f} s warm",
              file=sys.stderr, flush=True)
        save_result(output, "compile_cache", env, settings, rounds, {"summary": summarize(rounds)})
    print(markdown_table(summarize(rounds)))
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
