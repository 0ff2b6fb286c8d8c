"""Version- and backend-sensitive settings, kept in one place.

jax 0.10.x (Python 3.11, this CPU machine) and 0.11.x (the GPU machine) are supported.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compute_on import compute_on


def compiler_options() -> dict[str, Any]:
    """XLA options for our ahead-of-time compiled prefill/decode executables.

    On the CPU backend, XLA's default copy insertion copies every cache buffer that a step
    both reads and updates in place (the whole KV cache, every decode step: 3-4x slower at
    6k tokens for SmolLM2). Region-based analysis proves the read happens before the update
    and removes the copies (jax-ml/jax#25399). Other backends already do this.
    """
    if jax.default_backend() == "cpu":
        return {"xla_cpu_copy_insertion_use_region_analysis": True}
    return {}


def conditionals_sync_host() -> bool:
    """Whether a `lax.cond` on the default backend stops the host until the device is idle.

    XLA's GPU runtime branches on the host: each conditional copies its predicate to the
    host and blocks until the stream is done (`ConditionalThunk::ExecuteOnStream`;
    conditionals are not captured in CUDA graphs by default), so the queue of kernels
    launched ahead runs dry once per conditional. CPU and TPU branch without that. Decode
    steps use this to replace per-layer conditionals by branch-free code on GPUs.
    """
    return jax.default_backend() == "gpu"


def prefix_sums_as_scan() -> bool:
    """Whether prefix sums on the default backend are faster as an associative scan than as
    `jnp.cumsum` (see `kvjax.methods.base.prefix_sum`): on CPU only."""
    return jax.default_backend() == "cpu"


def set_compilation_cache(directory: Any, *, max_bytes: int, min_compile_s: float) -> None:
    """JAX's persistent compilation cache in `directory`, LRU-evicted beyond `max_bytes`
    (-1: no limit), storing programs that took at least `min_compile_s` to compile.

    Where this jax has no size option, every entry is kept. Eviction locks the directory
    with the `filelock` package (a dependency).
    """
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
    if hasattr(jax.config, "jax_compilation_cache_max_size"):
        jax.config.update("jax_compilation_cache_max_size", int(max_bytes))


def traced_sharding(sharding: Any) -> Any:
    """`sharding` in a form whose memory kind survives tracing an abstract value.

    jax (0.10 and 0.11) takes an abstract value's memory space only from a `NamedSharding`
    (`core.update_aval_with_sharding`): a `ShapeDtypeStruct` on a `SingleDeviceSharding` in
    `pinned_host` memory traces as device memory, where the real array traces as host
    memory. The same placement as a `NamedSharding` over a one-device mesh traces as the
    array does, and its executable runs on the array. Other shardings are returned as they
    are.
    """
    if not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    (device,) = sharding.device_set
    if sharding.memory_kind in (None, device.default_memory().kind):
        return sharding
    mesh = jax.sharding.Mesh(np.array([device]), ("one_device",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(), memory_kind=sharding.memory_kind)


def abstract_outputs(executable: Any) -> Any:
    """`ShapeDtypeStruct`s of a compiled program's outputs (shapes, dtypes, placements and
    memory kinds) that lower other programs exactly as its real outputs would."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=traced_sharding(x.sharding)),
                        executable.out_info)


def make_auto_mesh(shape: tuple[int, ...], names: tuple[str, ...], devices: list[jax.Device]) -> jax.sharding.Mesh:
    """A device mesh whose axes are all `Auto` (XLA propagates shardings from annotated
    inputs). `jax.make_mesh` defaults to `Explicit` axes (sharding in the types) on 0.10.x;
    it picks a device order suited to the interconnect."""
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)


def to_host(x: jax.Array) -> jax.Array:
    """Move an array to host memory (`pinned_host`), inside or outside jit."""
    return jax.device_put(x, jax.memory.Space.Host)


def host_bits(x: jax.Array) -> jax.Array:
    """An array as kept in host memory: 16-bit floats as their uint16 bit patterns.

    XLA's CPU backend computes bfloat16 in float32, and it hoists that conversion of a whole
    host array out of a loop that reads slices of it: every layer, every step converted the
    entire store (373-405 ms per layer for a 32k Llama-3-8B-shaped FreeKV pool,
    `bench/host_pool.py`). Integer slices need no conversion, and bitcasting the small
    slices on the device costs nothing. Bitcasting the host array itself inside jit copies
    it, so the store must be kept in this form."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def from_host_bits(x: jax.Array, dtype) -> jax.Array:
    """Slices read from a `host_bits` store, back in their dtype."""
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def to_device(x: jax.Array) -> jax.Array:
    """Move an array to device memory, inside or outside jit (a host -> device copy)."""
    return jax.device_put(x, jax.memory.Space.Device)


# jax <= 0.11.0: `compute_on(compute_type)` is a context manager; from 0.11.2 on it wraps a
# function and needs the outputs' memory space.
_COMPUTE_ON_WRAPS = "out_memory_spaces" in inspect.signature(compute_on).parameters


def on_host(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` computed on the host (XLA's `device_host` compute type); its operands must
    live in host memory and its outputs stay there."""
    if _COMPUTE_ON_WRAPS:
        return compute_on(fn, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)(*args)
    with compute_on("device_host"):
        return fn(*args)


def _take_rows(table: jax.Array, rows: jax.Array) -> jax.Array:
    return jnp.take(table, rows, axis=0, mode="clip")


def _per_row(fn: Callable[..., Any], head_axis: int, operands: int) -> Callable[..., Any]:
    """`fn(table, *others)` mapped (vmap) over the sequence axis (0) and `head_axis` of
    `table` and the two leading axes of the `operands - 1` others: gathers and scatters with
    explicit batch dimensions, which XLA's SPMD partitioner keeps local to each shard."""
    return jax.vmap(jax.vmap(fn, in_axes=(head_axis - 1,) + (0,) * (operands - 1)))


def host_take_rows(host: jax.Array, rows: jax.Array, head_axis: int = 1) -> jax.Array:
    """Rows of each (sequence, head) of a host-memory array, copied to device memory.

    host: [B, ..., H, ...] in `pinned_host` with heads on `head_axis`, viewed per (sequence,
    head) as [S, ...] (S: its first axis other than those two); rows: [B, H, n] int32
    indices into S (clamped into range). Returns [B, H, n, ...] in device memory. The gather
    is batched over (sequence, head) and runs on the host (`device_host` compute): on a mesh
    that splits sequences and heads, each device copies from its own shard of `host` (an
    index into the whole flattened array makes XLA gather the entire array onto every
    device).
    """
    return to_device(on_host(_per_row(_take_rows, head_axis, 2), host, to_host(rows)))


def host_put_rows(host: jax.Array, rows: jax.Array, values: jax.Array) -> jax.Array:
    """`host` [B, H, S, ...] with rows `rows` [B, H, n] of each (sequence, head) set to
    `values` [B, H, n, ...], updated in host memory, per (sequence, head) like
    `host_take_rows`. Out-of-range rows are dropped."""
    put = lambda table, r, x: table.at[r].set(x, mode="drop")
    return on_host(_per_row(put, 1, 3), host, to_host(rows), to_host(values.astype(host.dtype)))


def host_take_heads(host: jax.Array, rows: jax.Array) -> jax.Array:
    """`host_take_rows` for a host array without a sequence axis: host [H, S, ...], rows
    [H, n] -> [H, n, ...] in device memory, gathered per head (local to each device's heads
    on a mesh)."""
    return to_device(on_host(jax.vmap(_take_rows), host, to_host(rows)))
