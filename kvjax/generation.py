"""Text generation: bucketed jitted prefill, then one jitted `lax.while_loop` decode.

The evaluation protocol of Quest/ClusterKV is built in: an optional `question` is fed one
token per decode step after the context prefill, so query-aware methods see it, and only
then does generation start.

Compilation: prompts are padded (right) to a bucket length, the cache capacity is rounded
up, and the compiled prefill and decode executables are cached per static shape, so a new
prompt length inside a bucket compiles nothing. `COMPILE_COUNTS` counts the traces.

With `mesh=` (a `jax.sharding.Mesh`, see `kvjax.sharding`) the parameters, the cache and
the per-sequence inputs are laid out over the devices, and every jitted step keeps the cache
in that layout; the results are the same as on one device.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import numbers
import os
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from kvjax import sharding
from kvjax.cache import Cache, CacheSpec, init_cache, kv_bytes
from kvjax.checks import check_count, is_integer
from kvjax.compat import abstract_outputs, compiler_options, conditionals_sync_host, traced_sharding
from kvjax.methods import Full, Method
from kvjax.methods.full import DenseLayerCache
from kvjax.methods.base import check_method, prefix_sum
from models.bundle import Model
from models.config import ModelConfig
from models.llama import forward
from models.params import Params

# Trace counters per jitted entry point ("prefill", "decode"): tests use them to check that
# a decode step compiles once per shape.
COMPILE_COUNTS: collections.Counter[str] = collections.Counter()

MIN_BUCKET = 16
LARGE_BUCKET = 1024  # above this, prompt buckets grow in steps of BUCKET_STEP
BUCKET_STEP = 512  # the causal attention's block: long prompts are a whole number of blocks
CAPACITY_ROUND = 64
SAMPLE_CANDIDATES = 1024  # tokens ranked by `lax.top_k` before sampling falls back to a full sort
COMPILE_THREADS_ENV = "KVJAX_COMPILE_THREADS"  # at most this many programs compile at once (default: cores)


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    text: str | list[str]  # a list when `context` was a list (batch)
    tokens: list[int] | list[list[int]]  # generated ids only (no prompt, no question)
    stats: dict[str, Any]


def prompt_bucket(n: int) -> int:
    """Padded prompt length: powers of two up to 1024, then multiples of 512.

    Few shapes (few compilations) for short prompts, at most 511 padding tokens for long ones.
    """
    if n <= LARGE_BUCKET:
        return max(MIN_BUCKET, 1 << math.ceil(math.log2(max(n, 1))))
    return BUCKET_STEP * math.ceil(n / BUCKET_STEP)


def chat_prompt(tokenizer, message: str, system: str | None = None) -> str:
    """Render one user message with the tokenizer's chat template, ready for generation."""
    if not isinstance(message, str):
        raise TypeError(f"message must be a string, got {type(message).__name__}")
    if system is not None and not isinstance(system, str):
        raise TypeError(f"system must be a string, got {type(system).__name__}")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": message}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# Jitted pieces. `config` and `method` are static (hashable frozen dataclasses).


def _prefill(params: Params, tokens, positions, cache: Cache, *, config: ModelConfig, method: Method,
             mesh: Mesh | None = None):
    COMPILE_COUNTS["prefill"] += 1
    logits, cache = forward(params, tokens, positions, cache, method, config=config, last_only=True)
    return logits[:, 0], sharding.constrain(cache, mesh)


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array, greedy: bool,
                  candidates: int = SAMPLE_CANDIDATES) -> jax.Array:
    """Greedy, or temperature + nucleus (top-p) sampling: logits [B, V] float32 -> token ids [B] int32.

    The nucleus is the smallest prefix of the tokens ranked by probability whose mass reaches
    `top_p` (the first token always stays; `top_p >= 1`: every token). The draw is Gumbel-max
    in vocabulary order (the argmax of the scaled logits plus Gumbel noise over the nucleus
    samples the softmax restricted to it), so it does not depend on how the nucleus was
    found. Ranking all V tokens is a sort (13 ms for SmolLM2's 49152 on this CPU, against
    30-50 ms for a decode step), so the top `candidates` come from `lax.top_k` and only when
    they do not hold the nucleus of every row does a `lax.cond` rank them all. On GPUs
    (`conditionals_sync_host`) every token is ranked, with no conditional.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    probs = jax.nn.softmax(scaled, axis=-1)
    noisy = scaled + jax.random.gumbel(key, scaled.shape, jnp.float32)
    vocab = scaled.shape[-1]

    def nucleus_draw(k: int):
        """(the draw from the nucleus found among the top k tokens, whether they hold it)."""
        ranked = jax.lax.top_k(scaled, k)[1]
        p = jnp.take_along_axis(probs, ranked, axis=-1)
        mass = prefix_sum(p)  # of the tokens ranked up to each one
        keep = (mass - p) < top_p
        choice = jnp.argmax(jnp.where(keep, jnp.take_along_axis(noisy, ranked, axis=-1), -jnp.inf), axis=-1)
        return jnp.take_along_axis(ranked, choice[:, None], axis=-1)[:, 0], mass[:, -1] >= top_p

    k = min(candidates, vocab)
    if k == vocab or conditionals_sync_host():
        token = nucleus_draw(vocab)[0]
    else:
        token, held = nucleus_draw(k)
        token = jax.lax.cond(jnp.all(held) | (top_p >= 1), lambda: token, lambda: nucleus_draw(vocab)[0])
    return jnp.where(top_p >= 1, jnp.argmax(noisy, axis=-1), token).astype(jnp.int32)


def _decode(
    params: Params,
    cache: Cache,
    first_logits,
    forced,
    forced_len,
    max_new,
    eos_ids,
    key,
    temperature,
    top_p,
    *,
    config: ModelConfig,
    method: Method,
    greedy: bool,
    out_size: int,
    mesh: Mesh | None = None,
):
    """Feed the question (forced tokens) then sample until EOS or `max_new` tokens.

    forced: [B, Q] question ids, forced_len: [B]. Returns generated ids [B, out_size] (-1
    past the end), their count [B], the number of forward steps, the first step whose logits
    held a NaN or Inf per sequence [B] (-1: none; step 0 is the prompt's last token), and the
    final cache.
    """
    COMPILE_COUNTS["decode"] += 1
    batch = forced.shape[0]
    rows = jnp.arange(batch)

    def pick(step, logits, key, out, count, done, bad):
        """Choose the token after `step` forward steps and record it if it is generated."""
        nonfinite = ~jnp.all(jnp.isfinite(logits), axis=-1) & ~done
        bad = jnp.where((bad < 0) & nonfinite, step, bad)
        key, sub = jax.random.split(key)
        sampled = sample_tokens(logits, sub, temperature, top_p, greedy)
        is_forced = step < forced_len
        token = jnp.where(is_forced, forced[rows, jnp.minimum(step, forced.shape[1] - 1)], sampled)
        record = ~is_forced & ~done
        out = out.at[rows, jnp.where(record, count, out_size)].set(token, mode="drop")
        count = count + record
        done = done | (record & (jnp.isin(token, eos_ids) | (count >= max_new)))
        return token, key, out, count, done, bad

    out = jnp.full((batch, out_size), -1, jnp.int32)
    count = jnp.zeros((batch,), jnp.int32)
    done = jnp.zeros((batch,), bool)
    bad = jnp.full((batch,), -1, jnp.int32)
    token, key, out, count, done, bad = pick(jnp.int32(0), first_logits, key, out, count, done, bad)

    def cond(carry):
        step, _, _, _, _, _, done, _ = carry
        return ~jnp.all(done) & (step < forced.shape[1] + out_size)

    def body(carry):
        step, cache, token, key, out, count, done, bad = carry
        positions = cache.lengths[:, None]
        logits, cache = forward(params, token[:, None], positions, cache, method, config=config)
        cache = sharding.constrain(cache, mesh)
        step = step + 1
        token, key, out, count, done, bad = pick(step, logits[:, 0], key, out, count, done, bad)
        return step, cache, token, key, out, count, done, bad

    step, cache, _, _, out, count, _, bad = jax.lax.while_loop(
        cond, body, (jnp.int32(0), cache, token, key, out, count, done, bad)
    )
    # Every process reads the generated ids (multi-host): they are small, replicate them.
    out, count, bad = sharding.constrain_replicated((out, count, bad), mesh)
    return out, count, step, bad, sharding.constrain(cache, mesh)


def _convert(dense: Cache, *, method: Method, spec: CacheSpec, bucket: int, mesh: Mesh | None = None) -> Cache:
    """The cache `method` would have built from the prompt held in a `Full` cache."""
    COMPILE_COUNTS["convert"] += 1
    target = init_cache(method, spec)
    layers = tuple(
        method.ingest(i, layer, *(x[:, :, :bucket].transpose(0, 2, 1, 3) for x in (d.k, d.v)), dense.lengths)
        for i, (layer, d) in enumerate(zip(target.layers, dense.layers))
    )
    return sharding.constrain(Cache(layers=layers, lengths=dense.lengths), mesh)


def _init(*, method: Method, spec: CacheSpec, mesh: Mesh) -> Cache:
    """An empty cache allocated directly in its layout on `mesh` (no whole copy on one device)."""
    return sharding.constrain(init_cache(method, spec), mesh)


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "method", "mesh"), donate_argnames=("cache",))
_convert_jit = jax.jit(_convert, static_argnames=("method", "spec", "bucket", "mesh"))
_decode_jit = jax.jit(
    _decode, static_argnames=("config", "method", "greedy", "out_size", "mesh"), donate_argnames=("cache",)
)
_init_jit = jax.jit(_init, static_argnames=("method", "spec", "mesh"))
_EXECUTABLES: dict[Any, Any] = {}


def compiled(jitted, args: tuple, **static) -> tuple[Any, float]:
    """The compiled executable of `jitted` for these argument shapes, layouts and static values.

    Compiling ahead of time keeps compilation out of timed calls. Returns the executable and
    the seconds spent compiling it (0 when it was cached).
    """
    return compiled_together([(jitted, args, static)])[0]


def compile_threads() -> int:
    """How many programs `compiled_together` compiles at once: `$KVJAX_COMPILE_THREADS`, else
    the number of cores (each compilation uses one; more threads only add memory)."""
    value = os.environ.get(COMPILE_THREADS_ENV, "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{COMPILE_THREADS_ENV} must be an integer >= 1, got {value!r}")
    return int(value)


def compiled_together(requests: Iterable[tuple[Any, tuple, dict[str, Any]]]) -> list[tuple[Any, float]]:
    """`compiled` for several `(jitted, args, static)` programs, compiled concurrently.

    XLA compiles in C++ with the GIL released and one core per program, so programs that
    compile in a thread each take about as long as the slowest one when cores are free
    (a method's decode loop: 20-90 s on a CPU). Tracing and lowering are Python and stay
    sequential, overlapping the compilation of the programs lowered before. Each program's
    seconds are its own lowering plus compilation (wall time, so programs compiled side by
    side on busy cores each count the contention). At most `compile_threads()` compile at
    once. `requests` may be a generator: each request is lowered, then let go (its arrays
    can be freed) before the next is made. Arguments may be abstract (`ShapeDtypeStruct`s,
    see `compat.abstract_outputs`): such a program is the one its real arrays would get.
    """
    def build(lowered, lower_s: float) -> tuple[Any, float]:
        t0 = time.perf_counter()
        return lowered.compile(compiler_options=compiler_options()), lower_s + time.perf_counter() - t0

    results: dict[int, tuple[Any, float]] = {}
    pending: dict[Any, tuple[list[int], concurrent.futures.Future]] = {}  # key -> (request indices, compilation)
    with concurrent.futures.ThreadPoolExecutor(max_workers=compile_threads()) as pool:
        for i, (jitted, args, static) in enumerate(requests):
            leaves, treedef = jax.tree_util.tree_flatten(args)
            shapes = tuple((x.shape, str(x.dtype), traced_sharding(getattr(x, "sharding", None))) for x in leaves)
            key = (jitted, treedef, shapes, tuple(sorted(static.items(), key=str)))
            if key in _EXECUTABLES:
                results[i] = (_EXECUTABLES[key], 0.0)
            elif key in pending:
                pending[key][0].append(i)  # the same program twice: compiled once, counted once
            else:  # lowered here, compiled in a thread while the next request is lowered
                t0 = time.perf_counter()
                lowered = jitted.lower(*args, **static)
                pending[key] = ([i], pool.submit(build, lowered, time.perf_counter() - t0))
        for key, ((first, *repeats), compilation) in pending.items():
            exe, seconds = compilation.result()
            _EXECUTABLES[key] = exe
            results[first] = (exe, seconds)
            results.update((i, (exe, 0.0)) for i in repeats)
    return [results[i] for i in sorted(results)]


# ---------------------------------------------------------------------------------------------
# Host side.


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _pad_right(seqs: Sequence[Sequence[int]], width: int, fill: int) -> np.ndarray:
    out = np.full((len(seqs), width), fill, np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


@dataclasses.dataclass(frozen=True)
class Prefilled:
    first_logits: jax.Array  # [B, V] logits after each prompt's last token
    cache: Cache
    spec: CacheSpec
    bucket: int
    prefill_s: float
    compile_s: float
    mesh: Mesh | None = None  # where the cache lives (None: one device)


def prefill(model: Model, prompts: Sequence[Sequence[int]], method: Method, extra_tokens: int,
            mesh: Mesh | None = None) -> Prefilled:
    """Prefill a batch of token prompts (right-padded to a bucket) with `method`.

    The cache is sized for `extra_tokens` more tokens per sequence (question + generation).
    With `mesh`, `model`'s parameters should already be on it (`kvjax.sharding.shard_model`).
    """
    config = model.config
    check_token_ids("context", prompts, config.vocab_size)
    sharding.check_batch(mesh, len(prompts))
    lengths = np.array([len(p) for p in prompts])
    needed = int(lengths.max()) + extra_tokens
    if needed > config.max_position_embeddings:
        raise ValueError(
            f"context ({lengths.max()} tokens) + question + max_new_tokens = {needed} tokens "
            f"exceeds the model's trained context of {config.max_position_embeddings} tokens"
        )
    bucket = prompt_bucket(int(lengths.max()))
    capacity = CAPACITY_ROUND * math.ceil((bucket + extra_tokens) / CAPACITY_ROUND)
    spec = CacheSpec(
        batch=len(prompts),
        capacity=capacity,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=model.params.embed.dtype,
        prompt_capacity=bucket,
    )
    cache = init_cache(method, spec) if mesh is None else _init_jit(method=method, spec=spec, mesh=mesh)
    tokens = sharding.place_batch(_pad_right(prompts, bucket, 0), mesh)
    slots = np.arange(bucket)[None]
    positions = sharding.place_batch(np.where(slots < lengths[:, None], slots, -1).astype(np.int32), mesh)
    args = (model.params, tokens, positions, cache)
    exe, compile_s = compiled(_prefill_jit, args, config=config, method=method, mesh=mesh)
    t0 = time.perf_counter()
    first_logits, cache = exe(*args)
    first_logits.block_until_ready()
    return Prefilled(first_logits, cache, spec, bucket, time.perf_counter() - t0, compile_s, mesh)


def convert(pre: Prefilled, method: Method) -> Prefilled:
    """`method`'s prefilled cache derived from a `Full` prefill (the dense cache is kept).

    Every method's prefill is the same exact causal attention, so several methods can share
    one prefill; `prefill_s` then counts the shared prefill plus this method's indexing.
    """
    jitted, args, static = _convert_program(pre, method)
    exe, compile_s = compiled(jitted, args, **static)
    t0 = time.perf_counter()
    cache = exe(*args)
    jax.block_until_ready(cache)
    return dataclasses.replace(
        pre, cache=cache, prefill_s=pre.prefill_s + time.perf_counter() - t0,
        compile_s=pre.compile_s + compile_s,
    )


def _convert_program(pre: Prefilled, method: Method) -> tuple:
    """`(jitted, args, static)` of `convert`, for `compiled`."""
    for layer in pre.cache.layers:
        if not isinstance(layer, DenseLayerCache):
            raise ValueError("convert needs a prefill made with Full()")
    method.validate(pre.spec)
    return _convert_jit, (pre.cache,), dict(method=method, spec=pre.spec, bucket=pre.bucket, mesh=pre.mesh)


def check_generation_args(max_new_tokens: int, temperature: float, top_p: float, seed: int = 0) -> None:
    """Raise on sampling arguments `generate` cannot use (the CLI checks before loading a model)."""
    real = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
    check_count("max_new_tokens", max_new_tokens)
    if not real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if not real(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not is_integer(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def check_finite_logits(bad: np.ndarray, method: Method) -> None:
    """Raise on logits that held a NaN or Inf (`bad`: the first such forward step per
    sequence, -1 for none): greedy or sampled tokens from them would be a silent wrong answer."""
    rows = np.flatnonzero(bad >= 0)
    if rows.size:
        where = ", ".join(f"sequence {i} at step {bad[i]}" for i in rows)
        raise FloatingPointError(
            f"the model produced NaN or Inf logits ({where}; step 0: the logits after the prompt, "
            f"then one step per token fed) with {method!r}: its weights, activations "
            f"or cached keys/values are not finite (a float16/bfloat16 overflow, or corrupt weights)"
        )


def check_token_ids(name: str, sequences: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raise unless `sequences` is a non-empty batch of non-empty integer token id lists,
    every id in [0, vocab_size): the embedding lookup would silently clamp a wrong id."""
    if len(sequences) == 0:
        raise ValueError(f"{name} is empty: give a string, token ids, or a non-empty batch of either")
    for i, seq in enumerate(sequences):
        which = f"{name} {i}" if len(sequences) > 1 else name
        ids = np.asarray(seq)
        if ids.size == 0:
            raise ValueError(f"{which} holds no tokens: at least one is needed")
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{which} must be a string or a flat list of integer token ids, "
                            f"got an array of shape {ids.shape} and dtype {ids.dtype}")
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
        if bad.size:
            raise ValueError(f"{which}: token id {ids[bad[0]]} at position {bad[0]} is outside the "
                             f"model's vocabulary [0, {vocab_size})")


def check_model(model: Any) -> None:
    if not isinstance(model, Model):
        raise TypeError(f"model must be a loaded model (models.load('smollm2') or models.load(<checkpoint "
                        f"directory>)), got {model!r:.80}")


def _tokenize(tok, context, question) -> tuple[bool, list[list[int]], list[list[int]]]:
    """(batched, prompt ids, question ids) from generate's `context` and `question`."""
    if not isinstance(context, (str, list, tuple, np.ndarray, jax.Array)):
        raise TypeError(f"context must be a string, a list of strings, token ids (a list of ints or an integer "
                        f"array) or a list of token id lists, got {type(context).__name__}")
    if isinstance(question, Method):
        raise TypeError(f"question got the method {question!r}: pass it by keyword, method=...")
    batched = not isinstance(context, str) and not (
        len(context) > 0 and isinstance(context[0], (numbers.Number, np.number))
    )
    contexts = list(context) if batched else [context]
    prompts = [_encode(tok, c, True) if isinstance(c, str) else list(c) if np.ndim(c) == 1 else c
               for c in contexts]  # anything else fails `check_token_ids` in `prefill`
    if question is None:
        return batched, prompts, [[] for _ in prompts]
    qs = [question] * len(prompts) if isinstance(question, str) else question
    if not isinstance(qs, (list, tuple)) or not all(isinstance(q, str) for q in qs):
        raise TypeError(f"question must be a string or a list of strings (one per context), got {question!r:.80}")
    if len(qs) != len(prompts):
        raise ValueError(f"got {len(qs)} questions for a batch of {len(prompts)} contexts")
    return batched, prompts, [_encode(tok, q, False) for q in qs]


def generate(
    model: Model,
    context: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    question: str | Sequence[str] | None = None,
    method: Method | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> GenerationOutput:
    """Prefill `context` with `method`, feed `question` token by token, then generate.

    `context` may be a string, a list of strings (a batch), or token ids (a list of ints or a
    list of lists). `question` (one string, or one per batch row) is tokenized without
    special tokens. Greedy when `temperature == 0`. `mesh`: run on these devices
    (`kvjax.sharding.make_mesh`); the batch must split evenly over its `data` axis.
    """
    method = Full() if method is None else method
    check_model(model)
    check_method(method)
    check_generation_args(max_new_tokens, temperature, top_p, seed)
    batched, prompts, questions = _tokenize(model.tokenizer, context, question)
    model = _on_mesh(model, mesh)
    pre = prefill(model, prompts, method, extra_tokens=max((len(q) for q in questions), default=0) + max_new_tokens, mesh=mesh)
    return _decode_from(model, pre, method, prompts, questions, batched, max_new_tokens, temperature, top_p, seed)


def generate_many(
    model: Model,
    context: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
    methods: Sequence[Method],
    question: str | Sequence[str] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> list[GenerationOutput]:
    """`generate` with each of `methods` on the same input, sharing one prefill.

    The prompt is prefilled once with `Full()`; every other method's cache is derived from
    it (`convert`), so comparing methods costs one prefill, not one per method. The methods'
    programs compile side by side before any of them decodes (`compiled_together`).
    """
    if not isinstance(methods, (list, tuple)) or not methods:
        raise TypeError(f"methods must be a non-empty list of kvjax Methods (use generate for one), got {methods!r}")
    check_model(model)
    for method in methods:
        check_method(method)
    check_generation_args(max_new_tokens, temperature, top_p, seed)
    batched, prompts, questions = _tokenize(model.tokenizer, context, question)
    model = _on_mesh(model, mesh)
    dense = prefill(model, prompts, Full(), extra_tokens=max((len(q) for q in questions), default=0) + max_new_tokens, mesh=mesh)
    # One Full decodes last on the dense cache itself: decoding donates (consumes) it.
    last = max((i for i, m in enumerate(methods) if m == Full()), default=None)
    order = [j for j in range(len(methods)) if j != last] + ([last] if last is not None else [])
    # Every method's decode loop is compiled first, side by side (`compiled_together`). It is
    # lowered against the abstract outputs of its conversion program (compiled here, run just
    # before its decode), so no converted cache exists until it is decoded. A method's
    # `compile_s` is the shared prefill's plus its own conversion and decode programs'.
    convert_s: dict[int, float] = {}

    def lowering_cache(i: int) -> Any:
        if i == last:
            return dense.cache
        jitted, args, static = _convert_program(dense, methods[i])
        exe, convert_s[i] = compiled(jitted, args, **static)
        return abstract_outputs(exe)

    decodes = dict(zip(order, compiled_together(
        _decode_program(model, dense, lowering_cache(i), methods[i], questions, max_new_tokens, temperature,
                        top_p, seed)
        for i in order
    )))
    outputs: dict[int, GenerationOutput] = {}
    for i in order:
        pre = dense if i == last else convert(dense, methods[i])
        pre = dataclasses.replace(pre, compile_s=dense.compile_s + convert_s.get(i, 0.0) + decodes[i][1])
        outputs[i] = _decode_from(model, pre, methods[i], prompts, questions, batched,
                                  max_new_tokens, temperature, top_p, seed)
    return [outputs[i] for i in range(len(methods))]


def _on_mesh(model: Model, mesh: Mesh | None) -> Model:
    """`model` with its parameters on `mesh` (unchanged without a mesh)."""
    return model if mesh is None else sharding.shard_model(model, mesh)


def _decode_program(model: Model, pre: Prefilled, cache: Any, method: Method, questions: list[list[int]],
                    max_new_tokens: int, temperature: float, top_p: float, seed: int) -> tuple:
    """`(jitted, args, static)` of the decode loop over `cache`, for `compiled`."""
    mesh = pre.mesh
    q_width = max(1, max(len(q) for q in questions))
    args = (
        model.params,
        cache,
        pre.first_logits,
        sharding.place_batch(_pad_right(questions, q_width, 0), mesh),
        sharding.place_batch(np.array([len(q) for q in questions], np.int32), mesh),
        *(sharding.replicate(x, mesh) for x in (
            jnp.int32(max_new_tokens),
            jnp.asarray(model.eos_token_ids or (-1,), jnp.int32),
            jax.random.key(seed),
            jnp.float32(max(temperature, 1e-6)),
            jnp.float32(top_p),
        )),
    )
    static = dict(config=model.config, method=method, greedy=temperature == 0.0, out_size=max_new_tokens, mesh=mesh)
    return _decode_jit, args, static


def _decode_from(
    model: Model,
    pre: Prefilled,
    method: Method,
    prompts: list[list[int]],
    questions: list[list[int]],
    batched: bool,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> GenerationOutput:
    """Feed the questions, generate, and report (the prefilled cache is consumed)."""
    tok = model.tokenizer
    jitted, decode_args, static = _decode_program(model, pre, pre.cache, method, questions, max_new_tokens,
                                                  temperature, top_p, seed)
    decode_exe, decode_compile_s = compiled(jitted, decode_args, **static)
    t0 = time.perf_counter()
    out, count, steps, bad, cache = decode_exe(*decode_args)
    out = np.asarray(out)
    decode_s = time.perf_counter() - t0
    check_finite_logits(np.asarray(bad), method)
    counts = np.asarray(count)
    generated = [out[i, : counts[i]].tolist() for i in range(len(prompts))]
    texts = [tok.decode(g, skip_special_tokens=True) for g in generated]
    device_bytes, host_bytes = kv_bytes(cache)
    stats = {
        "prompt_tokens": [len(p) for p in prompts] if batched else len(prompts[0]),
        "prompt_bucket": pre.bucket,
        "prefill_s": pre.prefill_s,
        "decode_s": decode_s,
        "compile_s": pre.compile_s + decode_compile_s,
        "decode_steps": int(steps),
        "decode_ms_per_step": 1e3 * decode_s / max(int(steps), 1),
        "generated_tokens": int(counts.sum()),
        "tokens_per_s": float(counts.sum()) / decode_s if decode_s > 0 else float("nan"),
        "device_kv_bytes": device_bytes,
        "host_kv_bytes": host_bytes,
        "method": method.describe(),
    }
    stats.update(method.decode_stats(cache))
    if batched:
        return GenerationOutput(text=texts, tokens=generated, stats=stats)
    return GenerationOutput(text=texts[0], tokens=generated[0], stats=stats)
