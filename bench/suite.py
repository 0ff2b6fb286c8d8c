"""`kvjax bench all` and `kvjax bench compare`: every speed benchmark on whatever backend is
present, one JSON per machine, and one table (and plots) across such files.

`all` runs `bench/method_speed.py` (decode ms/token of every method against Full),
`bench/freekv.py` (FreeKV with and without host offload), `bench/stream.py` (streaming video
memory and time to first token: LiveVLM, FullVideo, ReKV), `bench/page_scores.py` and
`bench/prefix_sum.py` (both forms of the two operations whose form depends on the backend,
`pallas_kernels.compat.page_bounds_as_matmuls` and `kvjax.compat.prefix_sums_as_scan`: the
choice measured on the backend at hand) with a preset, and writes
`bench/results/<backend>-<device>-<date>.json` holding the results and the environment:

- `reduced`: contexts 2k/4k (FreeKV: 4k), 8 decode steps, `stream.py --reduced`, the two
  operation benchmarks with 3 rounds of 50 applications; 6 minutes on a 2-core VM, and
  about 40 s for the operation benchmarks;
- `full`: the issues' settings, 4k/16k/32k (FreeKV: 8k/16k/32k), 16 steps, streams of 64 to
  1024 frames (LiveVLM: 4096 and more), the operation benchmarks' defaults;
- `gpu`: `full` plus the Llama-3-8B shape in bfloat16 at 32k and 128k (page bounds with its
  heads too).

`compare FILES...` reads files written by `all` (or by `method_speed.py` / `freekv.py`
directly; a suite's other parts have no decode speed and are left out, files that are
not speed results are skipped with a notice) and prints one markdown table: decode ms/token
per method, context and file, the speedup over Full in the same file, and device KV MiB;
`--plot PNG` draws ms/token vs context, the speedup over Full and device KV bytes, one line
per (file, method).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

PRESETS: dict[str, list[tuple[str, list[str]]]] = {
    "reduced": [
        ("method_speed", ["--contexts", "2048", "4096", "--steps", "8", "--prefill-lengths",
                          "--methods", "full", "streaming_llm", "quest", "clusterkv_xla", "freekv"]),
        ("freekv", ["--contexts", "4096", "--steps", "8"]),
        ("stream", ["--reduced"]),
        ("page_scores", ["--rounds", "3", "--reps", "50"]),
        ("prefix_sum", ["--rounds", "3", "--reps", "50"]),
    ],
    "full": [
        ("method_speed", ["--contexts", "4096", "16384", "32768", "--prefill-lengths", "4096", "16384"]),
        ("freekv", ["--contexts", "8192", "16384", "32768"]),
        ("stream", []),
        ("page_scores", []),
        ("prefix_sum", []),
    ],
}
PRESETS["gpu"] = PRESETS["full"] + [
    ("method_speed", ["--shape", "llama3-8b", "--dtype", "bfloat16", "--contexts", "32768", "131072",
                      "--steps", "32", "--prefill-lengths",
                      "--methods", "full", "quest", "clusterkv_xla", "freekv"]),
    ("page_scores", ["--shape", "llama3-8b"]),
]


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def result_path(env: dict[str, Any]) -> Path:
    device = re.sub(r"[^A-Za-z0-9]+", "-", (env["devices"] or ["unknown"])[0]).strip("-").lower()
    return RESULTS / f"{env['backend']}-{device}-{datetime.date.today()}.json"


def run_all(preset: str, output: Path | None = None) -> Path:
    """Run the preset's benchmarks one after the other and merge their JSON into one file."""
    from kvjax.environment import environment

    mains = {name: importlib.import_module(f"bench.{name}").main for name in {n for n, _ in PRESETS[preset]}}
    env = environment()
    output = output or result_path(env)
    merged: dict[str, Any] = {"benchmark": "suite", "preset": preset, "environment": env, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, argv) in enumerate(PRESETS[preset]):
            log(f"## {name} {' '.join(argv)}")
            part = Path(tmp) / f"{i}.json"
            mains[name]([*argv, "--output", str(part)])
            merged["results"].append(json.loads(part.read_text()))
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(merged, indent=2) + "\n")  # after every part
    log(f"# wrote {output}")
    return output


SPEED_BENCHMARKS = ("method_speed", "freekv")  # what `compare` reads
# The parts of a suite without decode speed, each with its table: `all` prints them after the
# speed table, `compare` leaves them out.
OTHER_PARTS = {"stream": "bench.stream", "page_scores": "bench.page_scores", "prefix_sum": "bench.prefix_sum"}


def not_speed_result(path: Path) -> str | None:
    """Why `path` is not a speed result (a suite, method_speed or freekv result file), or
    None when it is one."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a JSON file"
    if not isinstance(data, dict):
        return "not a benchmark result"
    parts = data.get("results") if data.get("benchmark") == "suite" else [data]
    if isinstance(parts, list) and data.get("benchmark") == "suite":
        parts = [p for p in parts if not (isinstance(p, dict) and p.get("benchmark") in OTHER_PARTS)]
        if not parts:
            return "a suite without decode-speed results"
    for part in parts if isinstance(parts, list) and parts else [{}]:
        if not isinstance(part, dict) or part.get("benchmark") not in SPEED_BENCHMARKS:
            name = part.get("benchmark") if isinstance(part, dict) else None
            return f"not a speed result (benchmark={name!r})"
    return None


def speed_rows(path: Path) -> list[dict[str, Any]]:
    """(file, model, context, method, ms/token, speedup over Full, device KV bytes) rows of a
    suite, method_speed or freekv result file."""
    reason = not_speed_result(path)
    if reason:
        raise ValueError(f"{path}: {reason}")
    data = json.loads(Path(path).read_text())
    parts = data["results"] if data.get("benchmark") == "suite" else [data]
    rows = []
    for part in parts:
        if data.get("benchmark") == "suite" and part.get("benchmark") in OTHER_PARTS:
            continue  # no decode speed: `all` prints its own table
        backend = part["environment"]["backend"]
        model = part["settings"]["model"]
        for r in part["rows"]:
            full = r["methods"].get("full", {}).get("decode_ms_per_token")
            for method, m in r["methods"].items():
                ms = m["decode_ms_per_token"]
                rows.append({"file": Path(path).name, "backend": backend, "model": model,
                             "context": r["context"], "method": method, "ms_per_token": ms,
                             "speedup_over_full": full / ms if full and ms else None,
                             "device_kv_bytes": m.get("device_kv_bytes")})
    return rows


def compare_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| file | model | context | method | ms/token | speedup over Full | device KV MiB |",
             "|---|---|---:|---|---:|---:|---:|"]
    seen = set()
    for r in sorted(rows, key=lambda r: (r["file"], r["model"], r["context"], r["method"])):
        key = (r["file"], r["model"], r["context"], r["method"])
        if key in seen:  # Full is measured by both benchmarks of a suite: keep the first
            continue
        seen.add(key)
        speed = "-" if r["speedup_over_full"] is None else f"{r['speedup_over_full']:.2f}x"
        kv = "-" if r["device_kv_bytes"] is None else f"{r['device_kv_bytes'] / 2**20:.1f}"
        lines.append(f"| {r['file']} | {r['model']} | {r['context']} | {r['method']} "
                     f"| {r['ms_per_token']:.1f} | {speed} | {kv} |")
    return "\n".join(lines)


def compare_plot(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["file"], r["model"], r["method"]), []).append(r)
    for (file, model, method), rs in sorted(series.items()):
        rs = sorted({r["context"]: r for r in rs}.values(), key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        label = f"{method} ({file.removesuffix('.json')}, {model})"
        axes[0].plot(x, [r["ms_per_token"] for r in rs], marker="o", label=label)
        axes[1].plot(x, [r["speedup_over_full"] or float("nan") for r in rs], marker="o", label=label)
        axes[2].plot(x, [(r["device_kv_bytes"] or float("nan")) / 2**20 for r in rs], marker="o", label=label)
    titles = ("decode ms/token", "speedup over Full (same file)", "device KV MiB")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kvjax bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("all", help="every speed benchmark with a preset; one JSON")
    a.add_argument("--preset", choices=sorted(PRESETS), default="reduced")
    a.add_argument("--output", type=Path, default=None,
                   help="JSON path (default: bench/results/<backend>-<device>-<date>.json)")
    c = sub.add_parser("compare", help="one table (and plots) across result files")
    c.add_argument("files", type=Path, nargs="+")
    c.add_argument("--plot", type=Path, default=None, help="write the plots to this PNG")
    args = p.parse_args(argv)
    if args.action == "all":
        output = run_all(args.preset, args.output)
        print(compare_table(speed_rows(output)))
        for part in json.loads(output.read_text())["results"]:
            if part["benchmark"] in OTHER_PARTS:
                table = importlib.import_module(OTHER_PARTS[part["benchmark"]]).markdown_table
                print(f"\n{part['benchmark']}:\n" + table(part["rows"]))
        return 0
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"result files not found: {', '.join(missing)}")
    # A shell glob such as bench/results/*cpu*.json also matches accuracy, host_pool, ... results.
    speed = []
    for f in args.files:
        reason = not_speed_result(f)
        if reason:
            log(f"# skipped {f}: {reason}")
        else:
            speed.append(f)
    if not speed:
        raise ValueError(f"none of the {len(args.files)} files is a speed result (written by 'kvjax bench all', "
                         f"bench/method_speed.py or bench/freekv.py)")
    rows = [r for f in speed for r in speed_rows(f)]
    print(compare_table(rows))
    if args.plot:
        compare_plot(rows, args.plot)
        log(f"# wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
