"""FreeKV decode speed with host offload, against the same selection on the device and Full.

At each context (default 8k/16k/32k) with budget 1024 on the SmolLM2 architecture (random
weights; `--shape llama3-8b` on a GPU), one random dense prompt cache per context is built as
in `bench/method_speed.py` and decoded by:

- `full`: dense attention, the whole KV on the device;
- `freekv_device`: FreeKV, speculative, every page on the device (`offload=False`);
- `freekv_offload`: FreeKV, speculative, the pages in a host pool, the device holding
  `budget` tokens of slots per layer (+ page digests);
- `freekv_sync_offload`: the same with `speculative=False` (selection with the current query
  every step, no correction).

Reported: decode ms/token, device and host KV bytes, the correction rate (random keys and
weights: queries of consecutive steps are nearly unrelated, so the rate is high and the
speculative path pays for its corrections), and the ratios the FreeKV issue asks for. With
`--repeats`, every round times each variant once and each ratio is the median of its
per-round ratios (`bench.method_speed.interleaved_runs`).

`--real` uses the real SmolLM2-135M-Instruct instead, with a real dense prefill of novel
text shared by the variants (contexts up to its trained 8k): the correction rate is then
the model's own.

    .venv/bin/python -m bench.freekv --contexts 8192 16384 32768
    .venv/bin/python -m bench.freekv --real --contexts 4096 7680
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VARIANTS = ("full", "freekv_device", "freekv_offload", "freekv_sync_offload")


def variants(budget: int) -> dict[str, Any]:
    from bench.method_speed import freekv
    from kvjax import Full

    return {
        "full": Full(),
        "freekv_device": freekv(budget),
        "freekv_offload": freekv(budget, offload=True),
        "freekv_sync_offload": freekv(budget, offload=True, speculative=False),
    }


def real_prefill(model, context: int, steps: int):
    """A dense prefill of the first `context` tokens of the novel (shared by the variants)."""
    from bench.decode_speed import prompt_pool
    from kvjax import Full
    from kvjax.generation import prefill

    ids, _ = prompt_pool(model.tokenizer, context)
    return prefill(model, [ids[:context]], Full(), extra_tokens=steps + 1)


def ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float | None]:
    """The issue's ratios from interleaved runs: decode times per round (`paired_ratio`)."""
    from bench.method_speed import paired_ratio

    return {
        "offload_over_device": paired_ratio(runs, "freekv_offload", "freekv_device"),
        "sync_offload_over_offload": paired_ratio(runs, "freekv_sync_offload", "freekv_offload"),
        "full_over_offload": paired_ratio(runs, "full", "freekv_offload"),
        "full_device_kv_over_offload": paired_ratio(runs, "full", "freekv_offload", key="device_kv_bytes"),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    names = [n for n in VARIANTS if any(n in r["methods"] for r in rows)]
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    lines = ["| context | " + " | ".join(f"{n} ms/tok" for n in names)
             + " | offload / device | sync / spec offload | device KV Full / offload (MiB) | correction rate |",
             "|" + "---:|" * (len(names) + 5)]
    for r in rows:
        m, q = r["methods"], r["ratios"]
        cells = [fmt(m.get(n, {}).get("decode_ms_per_token"), ".1f") for n in names]
        mib = lambda n: m.get(n, {}).get("device_kv_bytes", 0) / 2**20
        lines.append(
            f"| {r['context']} | " + " | ".join(cells)
            + f" | {fmt(q['offload_over_device'], '.2f')} | {fmt(q['sync_offload_over_offload'], '.2f')}"
            + f" | {mib('full'):.0f} / {mib('freekv_offload'):.1f} ({fmt(q['full_device_kv_over_offload'], '.1f')})"
            + f" | {fmt(m.get('freekv_offload', {}).get('freekv_correction_rate'), '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench.method_speed import (add_speed_args, copy_prefill, interleaved_runs, record_runs, save_result,
                                    shaped_model, time_decode)
    from kvjax.environment import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_speed_args(p, contexts=[8192, 16384, 32768])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--real", action="store_true",
                   help="the real SmolLM2 weights and a real prefill of novel text (contexts <= 8k)")
    args = p.parse_args(argv)
    if any(c <= args.budget for c in args.contexts):
        p.error(f"--contexts must exceed --budget {args.budget}, got {args.contexts}")
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    env = environment()
    if args.real:
        import models

        model = models.load("smollm2")
    else:
        model = shaped_model(args.shape, max(args.contexts) + args.steps + 64, args.dtype)
    methods = variants(args.budget)
    tag = "-real" if args.real else ("" if args.shape == "smollm2" else f"-{args.shape}")
    output = args.output or REPO / "bench" / "results" / f"freekv{tag}-{env['backend']}-{datetime.date.today()}.json"

    settings = {"model": model.name, "shape": args.shape, "dtype": args.dtype, "budget": args.budget,
                "decode_steps": args.steps, "repeats": args.repeats,
                "repeat_order": "interleaved rounds (bench/method_speed.py `interleaved_runs`); ratios are "
                                "medians of per-round ratios",
                "methods": {n: methods[n].describe() for n in args.variants},
                "cache_contents": ("a real dense prefill of novel text" if args.real else
                                   "random normal keys/values (no real prefill); see bench/method_speed.py")}
    save = lambda: save_result(output, "freekv", env, settings, rows)

    rows = []
    for context in args.contexts:
        row: dict[str, Any] = {"context": context, "methods": {}}
        rows.append(row)
        shared = real_prefill(model, context, args.steps) if args.real else None

        done = record_runs(row, save, lambda res: f"{res['decode_ms_per_token']:.1f} ms/token, device KV "
                           f"{res['device_kv_bytes'] / 2**20:.1f} MiB, host KV {res.get('host_kv_bytes', 0) / 2**20:.1f} MiB")
        measure = lambda n: time_decode(model, methods[n], context, args.steps, seed=context,
                                        pre=None if shared is None else copy_prefill(shared))
        row["ratios"] = ratios(interleaved_runs(list(args.variants), measure, args.repeats, done))
        save()
    log(f"# wrote {output}")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
