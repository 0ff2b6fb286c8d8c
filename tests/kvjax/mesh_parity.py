"""Sharded vs single-device generation, run as a script in a process with 8 CPU devices.

`tests/kvjax/test_sharding.py` runs `python -m tests.kvjax.mesh_parity` (the test process has
initialised jax with one device) and checks the JSON it prints. For each mesh: generated
tokens of `Full`, `ClusterKV` and `FreeKV` (batch 4, ragged prompts, budgets below the
context) and of four `LiveVLM` text streams, on the mesh and on one device; the logits after
the prompt (prefill) and after each stream's question; method statistics; compile counts; donation warnings; and where cache arrays were
laid out. One process and one jax start-up for everything: compilation dominates its time.

Meshes: `data=2,model=2` on 4 devices, where every dimension splits, with the offloading
variants (`offload=True`, host-memory shards); `data=2,model=4` on 8 devices, where the query
heads and the MLP split but the 2 KV heads and the 258-token vocabulary replicate. The
offloading variants are compared with the single-device `offload=False` run: both give the
same outputs (tests/kvjax/test_clusterkv_offload.py, test_sparse_exactness.py). For them the
compiled decode loop is also searched for all-gathers / all-to-alls of the host arrays (host
offload copies per device, from each device's own shard).
"""

from __future__ import annotations

import os
from importlib.metadata import version


def cpu_xla_flags(devices: int) -> str:
    """XLA_FLAGS for `devices` CPU devices (set before jax starts), with XLA's CPU loop
    emitters, which compile these small programs about twice as fast as its fusion emitters,
    where the installed XLA still has them: jaxlib 0.11 aborts on the flag (checked with
    0.11.2, the GPU machine's)."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    major, minor = (int(x) for x in version("jaxlib").split(".")[:2])
    return flags + " --xla_cpu_use_fusion_emitters=false" if (major, minor) < (0, 11) else flags


# Before jax starts: 8 CPU devices whatever the machine.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = cpu_xla_flags(8)

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from kvjax import ClusterKV, FreeKV, Full, LiveVLM, ReKV, StreamSession, generate, generate_many  # noqa: E402
from kvjax.generation import _EXECUTABLES, COMPILE_COUNTS, _decode_jit, convert, prefill  # noqa: E402
from kvjax.methods.stream_memory import StreamLayout  # noqa: E402
from kvjax.sharding import make_mesh, place, shard_model  # noqa: E402
from models.bundle import Model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.params import init_random  # noqa: E402

# Fewer XLA optimisations, to compile faster still: the single-device and the sharded runs
# are compiled alike, so their comparison holds.
jax.config.update("jax_disable_most_optimizations", True)

# 8 query heads, 2 KV heads, MLP 128, vocabulary 258 (untied lm_head).
CONFIG = ModelConfig(
    architecture="llama", vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8,
    num_kv_heads=2, head_dim=8, max_position_embeddings=1024,
)
BATCH, CONTEXT, NEW = 4, 96, 12
CLUSTERKV = ClusterKV(budget=32, sink=4, tokens_per_cluster=8, window=8, window_clusters=2, dense_layers=0)
FREEKV = FreeKV(budget=32, page_size=4, sink=4, recent=8, tau=0.2, dense_layers=0)
METHODS = {"full": Full(), "clusterkv": CLUSTERKV, "freekv": FREEKV}
OFFLOADED = {"full": Full(), "clusterkv": dataclasses.replace(CLUSTERKV, offload=True),
             "freekv": dataclasses.replace(FREEKV, offload=True)}
MESHES = {  # spec -> (devices used, offload variants)
    "data=2,model=2": (4, True),
    "data=2,model=4": (8, False),
}
LIVE = LiveVLM(memory_tokens=32, short_frames=2, clip_frames=2, score_queries=8)
LIVES = (LIVE, dataclasses.replace(LIVE, vsb_score="keydiff"))  # streams alternate between them
STREAMS, FRAMES = 4, 8


class ByteTokenizer:
    """UTF-8 bytes as token ids: enough for text frames and questions (no chat template)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i % 256 for i in ids).decode(errors="replace")


def mesh_axes(array: jax.Array) -> list | None:
    """The mesh axis of each dimension of `array` (trailing replicated ones dropped), None on
    one device."""
    axes = list(getattr(array.sharding, "spec", None) or [])
    while axes and axes[-1] is None:
        axes.pop()
    return axes if isinstance(array.sharding, NamedSharding) else None


def layout(tree) -> dict[str, list]:
    """[mesh axes, memory kind] of every array of a pytree, by path."""
    return {jax.tree_util.keystr(path): [mesh_axes(leaf), leaf.sharding.memory_kind]
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# A collective in compiled HLO: result dimensions, op.
COLLECTIVE = re.compile(r"= \w+\[([\d,]*)\]\S* (all-gather|all-to-all)(?:-start)?\(")


def host_collectives(method, mesh, host_shapes: list[tuple[int, ...]]) -> list[str]:
    """All-gathers / all-to-alls in the compiled decode loop of `method` on `mesh` that move
    a host array's rows between devices (host offload must copy per device): a result
    holding at least one device's shard of a host array, with its trailing dimensions (or,
    for a flattened [rows, d] view, its last one)."""
    found = []
    for key, exe in _EXECUTABLES.items():
        static = dict(key[3])
        if key[0] is not _decode_jit or static["method"] != method or static["mesh"] != mesh:
            continue
        for line in exe.as_text().splitlines():
            match = COLLECTIVE.search(line)
            if not match:
                continue
            dims = tuple(int(x) for x in match.group(1).split(",") if x)
            for shape in host_shapes:
                tail = dims[-2:] == shape[-2:] or (len(dims) == 2 and dims[-1] == shape[-1])
                if dims and tail and math.prod(dims) >= math.prod(shape) // mesh.size:
                    found.append(line.strip()[:200])
    return found


def rekv_retrieval_collectives(mesh) -> list[str]:
    """Collectives of a compiled ReKV retrieval (bfloat16 host frames, heads split on
    `model`) that move retrieved rows or the host store: the copies must be per KV head.
    (The frame scores' mean over KV heads is an all-reduce of one score per frame.)"""
    layout = StreamLayout(num_layers=1, num_heads=8, num_kv_heads=2, head_dim=8, init_tokens=4, frame_tokens=4,
                          max_position=1024, dtype=jnp.bfloat16)
    method = ReKV(retrieve_frames=2, short_frames=2, clip_frames=2)
    state = place(method.init_state(layout), mesh)
    retrieve = jax.jit(lambda layer, s, q: method.retrieve(layout, layer, s, q, jnp.ones(q.shape[0], bool)))
    hlo = retrieve.lower(state.layers[0], state, jnp.ones((3, 8, 8), jnp.float32)).compile().as_text()
    return [line.strip()[:200] for line in hlo.splitlines()
            if re.search(r" (all-gather|all-to-all)(-start)?\(", line)
            or (re.search(r" (all-reduce|collective-permute)(-start)?\(", line) and re.search(r"_take|gather", line))]


def run(model, prompts, methods, mesh) -> dict:
    """Generation with every method (one shared prefill), logits, stats and cache layouts."""
    before = COMPILE_COUNTS.copy()
    outputs = generate_many(model, prompts, list(methods.values()), max_new_tokens=NEW, mesh=mesh)
    pre = prefill(model, prompts, Full(), extra_tokens=NEW, mesh=mesh)  # compiled above: same shapes
    result = {
        "tokens": {name: out.tokens for name, out in zip(methods, outputs)},
        "stats": {name: {k: v for k, v in out.stats.items() if k.startswith(("freekv_", "cluster", "recall"))}
                  for name, out in zip(methods, outputs)},
        "logits": np.asarray(pre.first_logits).tolist(),
        "layout": {"full": layout(pre.cache)},
    }
    result["host_collectives"] = {}
    for name, method in methods.items():
        if name != "full":
            cache = convert(pre, method).cache
            result["layout"][name] = layout(cache)
            host = [x.shape for x in jax.tree_util.tree_leaves(cache) if x.sharding.memory_kind == "pinned_host"]
            if host and mesh is not None:
                result["host_collectives"][name] = host_collectives(method, mesh, host)
    result["compiles"] = dict(COMPILE_COUNTS - before)
    return result


def run_streams(model, mesh) -> dict:
    """Four text streams through LiveVLM (VSB by attention, then by KeyDiff), one question each."""
    before = COMPILE_COUNTS.copy()
    tokens, logits = [], []
    for s in range(STREAMS):
        session = StreamSession(model, LIVES[s % 2], frame_tokens=32, mesh=mesh)
        for i in range(FRAMES):
            session.add_text(f"Minute {i + 1}: car {7 * s + i} passed.\n")
        answer = session.ask(f"Which car came after car {7 * s + 3}?", max_new_tokens=NEW)
        tokens.append(answer.tokens)
        logits.append(answer.logits.tolist())
    return {"tokens": tokens, "logits": logits, "layout": layout(session.state),
            "compiles": dict(COMPILE_COUNTS - before)}


def tiny_model() -> Model:
    """The tiny random Llama of `CONFIG` with byte tokens (scaled up: peaked distributions)."""
    return Model(CONFIG, init_random(CONFIG, jax.random.key(0), scale=0.3), ByteTokenizer(), "tiny-mesh")


def ragged_prompts() -> list[list[int]]:
    """`BATCH` random prompts of `CONTEXT`, `CONTEXT - 7`, ... tokens."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, CONFIG.vocab_size, size=CONTEXT - 7 * i).tolist() for i in range(BATCH)]


def main() -> None:
    model, prompts = tiny_model(), ragged_prompts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = {"single": {"generate": run(model, prompts, METHODS, None), "stream": run_streams(model, None)}}
        for spec, (devices, with_offload) in MESHES.items():
            mesh = make_mesh(spec, jax.devices()[:devices])
            sharded = shard_model(model, mesh)
            results[spec] = {
                "generate": run(sharded, prompts, OFFLOADED if with_offload else METHODS, mesh),
                "stream": run_streams(sharded, mesh),
                "params": layout(sharded.params),
            }
            if with_offload:
                results[spec]["rekv_retrieval_collectives"] = rekv_retrieval_collectives(mesh)
        try:
            generate(sharded, prompts[:3], mesh=mesh)
        except ValueError as e:
            results["errors"] = {"batch": str(e)}
    results["warnings"] = [str(w.message) for w in caught]
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
