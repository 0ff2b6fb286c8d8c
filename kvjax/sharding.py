"""Multi-device execution: parameters and caches laid out over a `jax.sharding.Mesh`.

A mesh has two axes: `data` splits the batch, `model` splits attention heads, the MLP
hidden size and the vocabulary. Nothing here communicates by hand: parameters and caches
get `NamedSharding`s, jitted steps pin the cache layout with `with_sharding_constraint`
(`constrain`), and XLA's SPMD partitioner derives the collectives (the all-reduce after
each row-parallel matmul, the gathers of a vocabulary-split embedding, ...).

Partition rules (a dimension whose size does not divide by its axis size is replicated
over that axis instead, e.g. 3 KV heads on `model=2`):

- parameters: `wq` columns and `wo` rows by query head, `wk`/`wv` columns by KV head (the
  Q/K/V biases likewise), `w_gate`/`w_up` columns and `w_down` rows by MLP unit, the
  embedding rows and `lm_head` columns by token id, on `model`; norm weights replicated;
- vision parameters (LLaVA-OneVision): SigLIP's `wq`/`wk`/`wv` columns and `wo` rows by head,
  `fc1` columns and `fc2_w` rows by MLP unit, the projector's `proj1` columns and `proj2_w`
  rows by hidden unit, on `model`; the rest replicated. A batch of frames splits over `data`
  where it divides (`place_frames`), and the features come back replicated;
- caches: each cache dataclass names its array dimensions (`kvjax.cache.axes`): `BATCH`
  goes on `data`, `HEADS` on `model`, every other dimension is replicated. Arrays in host
  memory (FreeKV's page pool, ClusterKV's clustered tokens, ReKV's frames) keep their
  memory kind: each device's shard lives in its host's memory.

A stream (`kvjax.StreamSession`) is one sequence: it has no batch dimension, so the `data`
axis replicates it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kvjax.cache import BATCH, HEADS
from kvjax.compat import make_auto_mesh
from models.bundle import Model
from models.config import ModelConfig
from models.llava_onevision import LlavaOnevisionConfig, LlavaOnevisionParams
from models.params import Params
from models.vision_bundle import VisionLanguageModel

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)
CACHE_AXES = {BATCH: DATA, HEADS: MODEL}  # cache dimension name -> mesh axis


def parse_mesh(spec: str) -> dict[str, int]:
    """Axis sizes from a spec such as "data=2,model=2" (an axis left out has size 1)."""
    sizes = {}
    for item in spec.split(","):
        name, sep, size = item.strip().partition("=")
        name = name.strip()
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"mesh spec {spec!r}: expected 'axis=size' items such as 'data=2,model=2', got {item!r}")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; the axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        sizes[name] = int(size)
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `data` x `model` mesh over exactly `devices` (default: every device of every
    process, `jax.devices()`); the axis sizes must multiply to their number.

    `spec` is a string ("data=2,model=2") or a mapping of axis sizes.
    """
    sizes = parse_mesh(spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in spec.items()))
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"mesh {spec!r} has {math.prod(sizes.values())} devices but there are {len(devices)}: "
                         f"the axis sizes must multiply to the number of devices")
    return make_auto_mesh(tuple(sizes.values()), MESH_AXES, devices)


def check_batch(mesh: Mesh | None, batch: int) -> None:
    """Raise ValueError when the batch does not split evenly over the `data` axis."""
    if mesh is not None and batch % mesh.shape[DATA]:
        n = mesh.shape[DATA]
        raise ValueError(f"a batch of {batch} sequences does not split over the mesh's data axis (data={n}): "
                         f"give a multiple of {n} sequences, or a mesh with a smaller data axis")


def _split(mesh: Mesh, axis: str | None, size: int) -> str | None:
    """`axis` when a dimension of `size` splits evenly over it, else None (replicated)."""
    return axis if axis is not None and size % mesh.shape[axis] == 0 else None


# ---------------------------------------------------------------------------------------------
# Parameters


Rules = Mapping[str, tuple[str | None, ...]]  # parameter field name -> mesh axis of each dimension


def _attention_rules(heads: str | None, kv_heads: str | None) -> Rules:
    """Attention projections split by head: Q columns and O rows by query head, K/V columns by KV head."""
    return {"wq": (None, heads), "wk": (None, kv_heads), "wv": (None, kv_heads), "wo": (heads, None),
            "bq": (heads,), "bk": (kv_heads,), "bv": (kv_heads,)}


def _by_name(tree: Any, rules: Rules, mesh: Mesh) -> Any:
    """The `NamedSharding` of every array of a parameter pytree: the rule of the field that
    holds it, replicated when its field has none."""

    def sharding(path: tuple[Any, ...], _: Any) -> NamedSharding:
        name = getattr(path[-1], "name", None)  # a dataclass field (GetAttrKey), not a list index
        return NamedSharding(mesh, PartitionSpec(*rules.get(name, ())))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def param_shardings(params: Params, config: ModelConfig, mesh: Mesh) -> Params:
    """The `NamedSharding` of every decoder parameter (a `Params` pytree of shardings).

    Head dimensions split on head boundaries only: `wq` (`[D, Hq*d]`) splits when `Hq`
    divides by the model axis, whatever `Hq*d` does.
    """
    heads, kv_heads, mlp, vocab = (_split(mesh, MODEL, n) for n in (
        config.num_heads, config.num_kv_heads, config.intermediate_size, config.vocab_size))
    return _by_name(params, {
        **_attention_rules(heads, kv_heads),
        "w_gate": (None, mlp), "w_up": (None, mlp), "w_down": (mlp, None),
        "embed": (vocab, None), "lm_head": (None, vocab),
    }, mesh)


def vision_shardings(params: LlavaOnevisionParams, config: LlavaOnevisionConfig,
                     mesh: Mesh) -> LlavaOnevisionParams:
    """The `NamedSharding` of every LLaVA-OneVision parameter: the SigLIP tower's attention
    by head and its MLP by unit, the projector (a 2-layer MLP) by hidden unit, on `model`;
    the text decoder as `param_shardings`; everything else (embeddings, norms, the output
    biases, `image_newline`) replicated."""
    v = config.vision
    heads, mlp, proj = (_split(mesh, MODEL, n) for n in (v.num_heads, v.intermediate_size, config.text.hidden_size))
    tower_and_projector = _by_name(params.replace(text=None), {
        **_attention_rules(heads, heads), "fc1_w": (None, mlp), "fc1_b": (mlp,), "fc2_w": (mlp, None),
        "proj1_w": (None, proj), "proj1_b": (proj,), "proj2_w": (proj, None),
    }, mesh)
    return tower_and_projector.replace(text=param_shardings(params.text, config.text, mesh))


def check_mesh(mesh: Any) -> None:
    """Raise when `mesh` is not a mesh with exactly the axes `data` and `model`."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != MESH_AXES:
        raise TypeError(f"mesh must be a jax.sharding.Mesh with axes {MESH_AXES} "
                        f"(kvjax.sharding.make_mesh('data=2,model=2')), got {mesh!r}")


def shard_model(model: Model, mesh: Mesh) -> Model:
    """`model` with its parameters placed on `mesh` (a no-op for parameters already there).

    A `VisionLanguageModel`'s vision tower and projector are placed too (its
    `llava_params.text` stays the decoder's `params`, one copy), and its `encode_frames`
    runs on the mesh: each batch of frames split over `data` where it divides.
    `kvjax.generate(..., mesh=mesh)` and `StreamSession(..., mesh=mesh)` place the parameters
    themselves; placing them once up front saves that copy on every call.
    """
    check_mesh(mesh)
    placed = jax.device_put(model.params, param_shardings(model.params, model.config, mesh))
    if not isinstance(model, VisionLanguageModel):
        return dataclasses.replace(model, params=placed)
    shardings = vision_shardings(model.llava_params, model.llava_config, mesh)
    vision = jax.device_put(model.llava_params.replace(text=None), shardings.replace(text=None))
    return dataclasses.replace(model, params=placed, llava_params=vision.replace(text=placed),
                               place_pixels=functools.partial(place_frames, mesh=mesh))


# ---------------------------------------------------------------------------------------------
# Caches


def cache_shardings(cache: Any, mesh: Mesh) -> Any:
    """The `NamedSharding` of every array of a cache pytree (same structure).

    Dimensions come from the `axes` fields of the cache dataclasses; a host-memory array
    keeps its memory kind. Inside jit (abstract arrays) the memory kind is left unset, which
    keeps each array in the memory space it is in.
    """

    def visit(node: Any, names: tuple[str | None, ...] | None) -> Any:
        if dataclasses.is_dataclass(node):
            return node.replace(**{
                f.name: visit(getattr(node, f.name), f.metadata.get("axes"))
                for f in dataclasses.fields(node) if f.metadata.get("pytree_node", True)
            })
        if isinstance(node, (tuple, list)):
            return type(node)(visit(x, None) for x in node)
        if node is None:
            return None
        return array_sharding(node, names, mesh)

    return visit(cache, None)


def array_sharding(x: Any, names: tuple[str | None, ...] | None, mesh: Mesh) -> NamedSharding:
    """The `NamedSharding` of one cache array whose dimensions are `names` (as in
    `kvjax.cache.axes`; None: replicated)."""
    names = (None,) * x.ndim if names is None else names
    if len(names) != x.ndim:
        raise ValueError(f"cache array of shape {x.shape} is declared with axes {names}")
    spec = PartitionSpec(*(_split(mesh, CACHE_AXES.get(n), size) for n, size in zip(names, x.shape)))
    concrete = isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    return NamedSharding(mesh, spec, memory_kind=x.sharding.memory_kind if concrete else None)


def place(cache: Any, mesh: Mesh | None) -> Any:
    """`cache` laid out on `mesh` (unchanged when `mesh` is None)."""
    return cache if mesh is None else jax.device_put(cache, cache_shardings(cache, mesh))


def constrain(cache: Any, mesh: Mesh | None) -> Any:
    """Inside jit: pin `cache` to its layout on `mesh`, so that a step returns the cache in
    the layout it received (its donated buffers are reused, and the next step's compiled
    executable accepts it). Unchanged when `mesh` is None."""
    return cache if mesh is None else jax.lax.with_sharding_constraint(cache, cache_shardings(cache, mesh))


def constrain_array(x: jax.Array, names: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
    """Inside jit: pin one array with dimensions `names` (`BATCH`, `HEADS`, None) to its
    layout on `mesh`. Unchanged when `mesh` is None."""
    return x if mesh is None else jax.lax.with_sharding_constraint(x, array_sharding(x, names, mesh))


def constrain_replicated(tree: Any, mesh: Mesh | None) -> Any:
    """Inside jit: every device (and process) holds `tree` whole. Unchanged without a mesh."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


def place_batch(x: Any, mesh: Mesh | None) -> jax.Array:
    """A per-sequence host input (`[B, ...]`, the same on every process) split over `data`."""
    if mesh is None:
        return jnp.asarray(x)
    return jax.device_put(np.asarray(x), NamedSharding(mesh, PartitionSpec(DATA)))


def place_frames(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A batch of host frames (`[T, ...]`, the same on every process) split over `data` where
    `T` divides, else replicated: a vision batch need not match the mesh."""
    return jax.device_put(np.asarray(x), NamedSharding(mesh, PartitionSpec(_split(mesh, DATA, len(x)))))


def replicate(x: Any, mesh: Mesh | None) -> jax.Array:
    """A host input every device needs whole (scalars, tables, a PRNG key), the same on every
    process. It goes through numpy: only host values can be placed on other processes'
    devices."""
    if mesh is None:
        return jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(replicate(jax.random.key_data(x), mesh))
    return jax.device_put(np.asarray(x), NamedSharding(mesh, PartitionSpec()))
