"""FreeKV's host pool: which layout makes the gather + host -> device transfer fastest.

ALGORITHMS.md section 4 asks for the head-major pool `[B, pages, Hkv, 2, P, d]` in host
memory, `pinned_host` or numpy, whichever is faster. One call copies `n` missing
(sequence, page, KV head) blocks to the device; three ways are timed side by side:

- `pinned_per_block`: the pool is a jax array in `pinned_host` memory and the jitted step
  copies one block per KV head at a time, all heads in one host gather (`FreeKV._gather`,
  the code the method runs, on the pool as FreeKV stores it: 16-bit floats as uint16 bits);
- `pinned_host_gather`: the same pool, the gather computed on the host (XLA `device_host`
  compute) and the `n` blocks sent in one transfer;
- `numpy`: the pool is a numpy array; numpy fancy-indexes the blocks and `jax.device_put`
  sends them (outside jit, so the decode step would have to be split around it);
- `pinned_per_block_16bit_floats` (bfloat16 only): the per-block copies on a pool stored as
  bfloat16 rather than its bits, which is what FreeKV did before `host_bits`.

On a CPU backend host and device memory are the same RAM: the numbers compare the per-call
overheads, not PCIe. Run it on a GPU for the transfer itself.

    python -m bench.host_pool [--shape smollm2|llama3-8b] [--blocks 6 24 96]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench.method_speed import save_result
from kvjax.compat import host_bits, on_host, to_device, to_host
from kvjax.methods.freekv import FreeKV

# (KV heads, head dim) of the benchmark shapes; 32k context in pages of 32 tokens.
SHAPES = {"smollm2": (3, 64), "llama3-8b": (8, 128)}
PAGE, PAGES = 32, 1024


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn()` (which must block until its result is ready), after one
    warm-up call that also compiles."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def selection(n: int, hkv: int, rng: np.random.Generator):
    """`n` distinct missing (page, head) blocks for one sequence, as FreeKV's planner returns
    them: pages [1, Hkv, top], missing [1, Hkv, top], target slots [1, Hkv, top]."""
    top = -(-n // hkv)
    pages = np.stack([rng.choice(PAGES, top, replace=False) for _ in range(hkv)])[None]
    missing = (np.arange(hkv * top) < n).reshape(1, hkv, top)
    target = np.broadcast_to(np.arange(top), (1, hkv, top))
    return (jnp.asarray(pages, jnp.int32), jnp.asarray(missing), jnp.asarray(target, jnp.int32))


def variants(n: int, hkv: int, d: int, dtype, rng: np.random.Generator) -> dict[str, Callable[[], Any]]:
    """The ways of copying the same `n` blocks, each a blocking zero-argument call."""
    pool_np = rng.standard_normal((1, PAGES, hkv, 2, PAGE, d)).astype(dtype)
    pool = to_host(jnp.asarray(pool_np))
    method_pool = to_host(host_bits(jnp.asarray(pool_np)))  # as FreeKV stores it
    pages, missing, target = selection(n, hkv, rng)
    method = FreeKV(budget=PAGE * (2 + 2 + -(-n // hkv)), page_size=PAGE, sink=2 * PAGE,
                    recent=2 * PAGE, offload=True)

    # Blocks compacted per head: the missing ones lead each head's entries, so the first `n`
    # of the flattened [1, Hkv, top] entries are the `n` missing blocks in head-major order.
    top = pages.shape[2]
    per_block = jax.jit(lambda pool, pages, missing, target:
                        method._gather(pool, pages, missing, target, pool_np.dtype, top)[0].reshape(
                            hkv * top, 2, PAGE, d)[:n])

    # The same blocks in the same (head-major) order as `missing`.
    page_idx = np.asarray(pages[0]).reshape(-1)[:n]
    head_idx = np.repeat(np.arange(hkv), pages.shape[2])[:n]
    rows = jnp.asarray(page_idx * hkv + head_idx, jnp.int32)  # rows of the [pages * Hkv, 2, P, d] view

    @jax.jit
    def host_gather(pool, rows):
        take = lambda table, r: jnp.take(table.reshape(PAGES * hkv, 2, PAGE, d), r, axis=0, mode="clip")
        return to_device(on_host(take, pool, to_host(rows)))

    calls = {
        "pinned_per_block": lambda: per_block(method_pool, pages, missing, target).block_until_ready(),
        "pinned_host_gather": lambda: host_gather(pool, rows).block_until_ready(),
        "numpy": lambda: jax.device_put(pool_np[0, page_idx, head_idx]).block_until_ready(),
    }
    if pool_np.dtype.itemsize == 2:  # the same copies on the pool as 16-bit floats (before `host_bits`)
        calls["pinned_per_block_16bit_floats"] = lambda: per_block(pool, pages, missing, target).block_until_ready()
    return calls


def main(argv: list[str] | None = None) -> int:
    from kvjax.environment import environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--blocks", type=int, nargs="+", default=[6, 24, 96],
                   help="blocks copied per call (one layer's missing pages over its KV heads)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = p.parse_args(argv)

    env = environment()
    output = args.output or Path("bench/results") / f"host_pool-{env['backend']}-{datetime.date.today()}.json"
    hkv, d = SHAPES[args.shape]
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else np.float32
    settings = {"shape": args.shape, "kv_heads": hkv, "head_dim": d, "page_size": PAGE, "pool_pages": PAGES,
                "dtype": args.dtype, "repeats": args.repeats,
                "note": "one call = one layer's recall; on a CPU backend host and device are the same RAM"}
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    for n in args.blocks:
        calls = variants(n, hkv, d, dtype, rng)
        copied = {name: np.asarray(fn(), np.float32) for name, fn in calls.items()}
        for name, blocks in copied.items():  # all three must copy the same blocks
            if not np.array_equal(blocks, copied["numpy"]):
                raise AssertionError(f"{name} copied other blocks than numpy indexing ({n} blocks)")
        times = {name: median_seconds(fn, args.repeats) for name, fn in calls.items()}
        block_bytes = 2 * PAGE * d * np.dtype(dtype).itemsize
        for name, s in times.items():
            rows.append({"blocks": n, "layout": name, "us_per_call": round(s * 1e6, 1),
                         "MB_per_s": round(n * block_bytes / s / 1e6, 1),
                         "vs_pinned_per_block": round(s / times["pinned_per_block"], 3)})
        print(f"{n:4d} blocks: " + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in times.items()), file=sys.stderr)
        save_result(output, "host_pool", env, settings, rows)
    print(f"# wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
