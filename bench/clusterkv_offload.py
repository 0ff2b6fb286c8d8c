"""ClusterKV recall from host (`offload=True`) on the real SmolLM2: cluster hit rate, bytes
copied per step and decode speed, next to the same selection kept on the device.

For each novel, context length and budget, one `Full` prefill of the novel's opening is
shared by `ClusterKV(budget)` and `ClusterKV(budget, offload=True)`; both continue the text
greedily for `--new-tokens` tokens. Offload changes where the clustered tokens live, not
which ones are attended, so the two must generate the same tokens (checked). Reported per
run: the cluster hit rate (selected clusters that the previous step had selected too), the
bytes copied host -> device per step against copying the whole selection every step (no
reuse between steps), device and host KV bytes, and decode ms/token of both. On a CPU host
and device memory are one RAM: the speed ratio there shows the recall's bookkeeping cost,
not a transfer saving.

    python -m bench.clusterkv_offload            # 4k and 7.5k tokens, budgets 256 and 1024
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # allow `python bench/clusterkv_offload.py` as well as `-m`
    sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data"
DEFAULT_TEXTS = (DATA / "pride_and_prejudice.txt", DATA / "sherlock_holmes.txt")


def whole_selection_bytes(method, config, dtype_bytes: int) -> int:
    """Bytes one decode step would copy if it recalled its whole selection (no reuse): the
    `budget - sink` selected tokens' K and V rows, per recall head and sparse layer."""
    heads = config.num_heads if method.selection == "query_head" else config.num_kv_heads
    sparse_layers = config.num_layers - method.dense_layers
    return (method.budget - method.sink) * 2 * config.head_dim * dtype_bytes * heads * sparse_layers


def measure(model, tokens: list[int], budget: int, new_tokens: int) -> dict[str, Any]:
    """Decode `new_tokens` after `tokens` with ClusterKV on the device and with offload."""
    from kvjax import ClusterKV
    from kvjax.generation import generate_many

    on_device, offload = ClusterKV(budget=budget), ClusterKV(budget=budget, offload=True)
    outs = generate_many(model, tokens, [on_device, offload], max_new_tokens=new_tokens)
    dev, off = (o.stats for o in outs)
    agree = sum(a == b for a, b in zip(outs[0].tokens, outs[1].tokens))
    itemsize = model.params.embed.dtype.itemsize
    whole = whole_selection_bytes(offload, model.config, itemsize)
    return {
        "budget": budget,
        "decode_steps": off["decode_steps"],
        "tokens_agreeing": agree,
        "tokens_generated": len(outs[1].tokens),
        "cluster_hit_rate": off["cluster_hit_rate"],
        "recall_bytes_per_step": off["recall_bytes_per_step"],
        "whole_selection_bytes_per_step": whole,
        "copied_share": off["recall_bytes_per_step"] / whole,
        "device_kv_bytes": {"on_device": dev["device_kv_bytes"], "offload": off["device_kv_bytes"]},
        "host_kv_bytes": off["host_kv_bytes"],
        "decode_ms_per_token": {"on_device": dev["decode_ms_per_step"], "offload": off["decode_ms_per_step"]},
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| text | context | budget | cluster hit rate | MiB copied / step | whole selection MiB / step "
             "| device KV MiB (on device / offload) | ms/token on device | ms/token offload | same tokens |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    mib = lambda b: f"{b / 2**20:.1f}"
    for r in rows:
        ms, kv = r["decode_ms_per_token"], r["device_kv_bytes"]
        lines.append(
            f"| {r['text']} | {r['context']} | {r['budget']} | {r['cluster_hit_rate']:.3f} "
            f"| {mib(r['recall_bytes_per_step'])} ({100 * r['copied_share']:.0f}%) | {mib(r['whole_selection_bytes_per_step'])} "
            f"| {mib(kv['on_device'])} / {mib(kv['offload'])} | {ms['on_device']:.1f} | {ms['offload']:.1f} "
            f"({ms['offload'] / ms['on_device']:.2f}x) | {r['tokens_agreeing']}/{r['tokens_generated']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import jax

    import models
    from bench.method_speed import save_result
    from kvjax.environment import environment
    from kvjax.eval.perplexity import load_text_tokens

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=Path, nargs="+", default=list(DEFAULT_TEXTS))
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 7680])
    p.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = p.parse_args(argv)
    missing = [str(t) for t in args.texts if not t.is_file()]
    if missing:
        p.error(f"--texts: file(s) not found: {', '.join(missing)} (the novels live in ../shared/data)")

    model = models.load("smollm2")
    env = environment()
    output = args.output or REPO / "bench" / "results" / f"clusterkv_offload-{env['backend']}-{datetime.date.today()}.json"
    settings = {"model": model.name, "new_tokens": args.new_tokens, "lengths": args.lengths,
                "budgets": args.budgets, "texts": [t.name for t in args.texts],
                "note": "host and device memory are the same RAM on a CPU" if jax.default_backend() == "cpu" else ""}
    rows: list[dict[str, Any]] = []
    for text in args.texts:
        tokens = load_text_tokens(model, text, max(args.lengths))
        for length in args.lengths:
            for budget in args.budgets:
                row = {"text": text.stem, "context": length, **measure(model, tokens[:length], budget, args.new_tokens)}
                rows.append(row)
                save_result(output, "clusterkv_offload", env, settings, rows)
                print(f"{text.stem} {length} budget {budget}: hit rate {row['cluster_hit_rate']:.3f}, "
                      f"copied {100 * row['copied_share']:.0f}% of the selection", file=sys.stderr, flush=True)
    print(markdown_table(rows))
    print(f"# wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
