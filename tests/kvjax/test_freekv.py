"""FreeKV against an independent numpy reference (ALGORITHMS.md section 4)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import Cache, Full, init_cache
from kvjax.methods import make_method
from kvjax.methods.freekv import FreeKV
from tests.kvjax.method_harness import HKV, HQ, D, check_prefill, check_steps_per_head, run_method, spec

G = HQ // HKV


def np_regions(c, m: FreeKV):
    """(sink end, first recent position, candidate pages) with `c` cached tokens."""
    p = m.page_size
    r0 = max(c // p - m.recent // p + 1, 0)
    return min(m.sink, r0 * p), r0 * p, list(range(m.sink // p, r0))


def np_select(qs, k, c, m: FreeKV):
    """Pages one KV head retrieves: qs [G, d] its query group, k [S, d] its keys."""
    p = m.page_size
    cands = np_regions(c, m)[2]
    if not cands:
        return []
    bounds = np.array(
        [[np.maximum(q * k[j * p : (j + 1) * p].min(0), q * k[j * p : (j + 1) * p].max(0)).sum() for j in cands]
         for q in qs.astype(np.float64)]
    )  # [G, candidates]
    e = np.exp(bounds - bounds.max(axis=1, keepdims=True))
    score = (e / e.sum(axis=1, keepdims=True)).mean(axis=0)
    order = sorted(range(len(cands)), key=lambda i: (-score[i], i))
    return [cands[i] for i in order[: m.top_pages]]


def np_group_cos(a, b):
    """mean over the group of cos(a[g], b[g]); a, b [G, d]."""
    return float(np.mean([x @ y / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]))


def np_step(q, k, b, c, first, m: FreeKV, kv_head):
    """(retrieved pages, corrected?) of one KV head at the decode step of position c."""
    group = slice(kv_head * G, (kv_head + 1) * G)
    if not m.speculative or first:
        return np_select(q[b, c, group], k[b, :, kv_head], c, m), False
    if np_group_cos(q[b, c, group], q[b, c - 1, group]) < m.tau:
        return np_select(q[b, c, group], k[b, :, kv_head], c, m), True
    return np_select(q[b, c - 1, group], k[b, :, kv_head], c, m), False


def np_keep(pages, c, m: FreeKV):
    sink_end, recent_start, _ = np_regions(c, m)
    keep = np.zeros(c + 1, bool)
    keep[:sink_end] = True
    for j in pages:
        keep[j * m.page_size : (j + 1) * m.page_size] = True
    keep[recent_start:] = True
    return keep


def counters(cache, q, positions):
    return np.asarray(cache.corrections), np.asarray(cache.checks)


@pytest.mark.parametrize(
    "method,lengths,steps",
    [
        (FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=0.1, dense_layers=0), [37, 20, 5], 14),
        (FreeKV(budget=24, page_size=4, sink=0, recent=4, tau=0.3, dense_layers=0), [45, 29], 11),
        (FreeKV(budget=40, page_size=8, sink=8, recent=16, tau=0.05, dense_layers=0), [70, 33], 12),
        (FreeKV(budget=24, page_size=4, sink=4, recent=8, dense_layers=0, speculative=False), [37, 20], 9),
    ],
    ids=["sink4", "nosink", "page8", "nonspeculative"],
)
def test_decode_matches_numpy_reference(method, lengths, steps):
    out, step_list, q, k, v = run_method(method, lengths, steps, seed=method.budget + method.recent,
                                         observe=counters)
    check_prefill(out, q, k, v, lengths)

    def keep(step, b, h):
        c = step[1][b]
        return np_keep(np_step(q, k, b, c, c == lengths[b], method, h // G)[0], c, method)

    check_steps_per_head(step_list, q, k, v, keep)

    # Correction counters: cumulative per (sequence, KV head), observed before each step.
    corrected = np.zeros((len(lengths), HKV), int)
    for i, step in enumerate(step_list):
        corrections, checks = step[2]
        np.testing.assert_array_equal(corrections, corrected)
        np.testing.assert_array_equal(checks, max(i - 1, 0) if method.speculative else 0)
        for b, c in enumerate(step[1]):
            for m in range(HKV):
                corrected[b, m] += np_step(q, k, b, c, c == lengths[b], method, m)[1]
    if method.speculative:  # the constructed cases mix corrected and speculative heads
        assert 0 < corrected.sum() < (steps - 1) * len(lengths) * HKV


def test_covering_budget_equals_full():
    lengths, steps = [45, 30], 12
    full = run_method(Full(), lengths, steps, seed=3)[1]
    method = FreeKV(budget=64, page_size=8, sink=8, recent=16, tau=0.5, dense_layers=0)
    got = run_method(method, lengths, steps, seed=3)[1]
    for (a, *_), (b, *_) in zip(full, got):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_tau_one_equals_selection_with_the_current_query():
    method = FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=1.0, dense_layers=0)
    lengths, steps = [37, 26], 10
    spec_run = run_method(method, lengths, steps, seed=5)[1]
    plain = run_method(dataclasses.replace(method, speculative=False), lengths, steps, seed=5)[1]
    for (a, *_), (b, *_) in zip(spec_run, plain):
        np.testing.assert_array_equal(a, b)


def _decode_with_queries(method, queries, prompt=40):
    """Prefill `prompt` random tokens, then decode with the given per-step queries [T, Hq, d]."""
    rng = np.random.default_rng(0)
    steps = len(queries)
    cache = init_cache(method, spec(1, prompt + steps)).layers[0]
    k = rng.standard_normal((1, prompt + steps, HKV, D)).astype(np.float32)
    v = rng.standard_normal((1, prompt + steps, HKV, D)).astype(np.float32)
    q0 = rng.standard_normal((1, prompt, HQ, D)).astype(np.float32)
    _, cache = method.prefill(0, cache, q0, k[:, :prompt], v[:, :prompt], jnp.array([prompt]))
    attend = jax.jit(lambda c, q, k, v, n: method.attend(0, c, q, k, v, n))
    for t in range(steps):
        pos = prompt + t
        _, cache = attend(cache, queries[t][None], k[:, pos], v[:, pos], jnp.array([pos]))
    return cache


def test_correction_counter_on_constructed_queries():
    method = FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=0.8, dense_layers=0)
    rng = np.random.default_rng(1)
    steps = 6
    same = np.repeat(rng.standard_normal((1, HQ, D)).astype(np.float32), steps, axis=0)
    cache = _decode_with_queries(method, same)
    assert np.asarray(cache.checks).tolist() == [steps - 1]
    assert np.asarray(cache.corrections).tolist() == [[0] * HKV]
    stats = method.decode_stats(Cache(layers=(cache,), lengths=jnp.zeros(1, jnp.int32)))
    assert stats["freekv_correction_rate"] == 0.0

    # Each step's query is orthogonal to the previous one in every head: all heads re-select.
    basis = np.eye(D, dtype=np.float32)
    turning = np.stack([np.broadcast_to(3.0 * basis[t % D], (HQ, D)) for t in range(steps)])
    cache = _decode_with_queries(method, turning)
    assert np.asarray(cache.corrections).tolist() == [[steps - 1] * HKV]
    stats = method.decode_stats(Cache(layers=(cache,), lengths=jnp.zeros(1, jnp.int32)))
    assert stats["freekv_correction_rate"] == 1.0
    assert stats["freekv_correction_rate_per_layer"] == [1.0]


def test_prefill_resets_the_previous_query():
    method = FreeKV(budget=24, page_size=4, sink=4, recent=8, dense_layers=0)
    rng = np.random.default_rng(2)
    cache = _decode_with_queries(method, rng.standard_normal((3, HQ, D)).astype(np.float32))
    assert bool(cache.has_prev[0])
    k = jnp.asarray(rng.standard_normal((1, 16, HKV, D)), jnp.float32)
    cache = method.ingest(0, cache, k, k, jnp.array([16]))
    assert not bool(cache.has_prev[0])
    assert int(cache.checks[0]) == 0 and int(cache.corrections.sum()) == 0


def test_make_method_and_defaults():
    m = make_method("freekv", budget=48, page_size=4, sink=8, recent=8)
    assert m == FreeKV(budget=48, page_size=4, sink=8, recent=8)
    d = FreeKV()
    assert (d.budget, d.page_size, d.sink, d.recent, d.tau, d.dense_layers) == (2048, 32, 512, 512, 0.8, 1)
    assert d.top_pages == 32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"budget": 1024}, "budget must be an integer >= 1056"),
        ({"budget": 1060}, "budget must be sink \\+ recent \\+ k \\* page_size"),
        ({"sink": 500}, "sink must be a multiple of page_size"),
        ({"recent": 100, "budget": 2048 - 412 + 0}, "recent must be a multiple of page_size"),
        ({"recent": 0}, "recent must be an integer >= 32"),
        ({"sink": -32}, "sink must be an integer >= 0"),
        ({"page_size": 0}, "page_size"),
        ({"tau": 0.0}, "tau must be a number in \\(0, 1\\]"),
        ({"tau": 1.5}, "tau"),
        ({"speculative": 1}, "speculative must be True or False"),
        ({"impl": "triton"}, "impl must be one of"),
        ({"dense_layers": -1}, "dense_layers"),
    ],
)
def test_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreeKV(**kwargs)  # on construction, before any cache exists


def test_generate_reports_the_correction_rate(tiny_lm):
    from kvjax import generate

    ids = np.random.default_rng(4).integers(100, 49152, 90).tolist()
    out = generate(tiny_lm, ids, method=FreeKV(budget=48, page_size=8, sink=8, recent=16, tau=0.9),
                   max_new_tokens=6)
    rate = out.stats["freekv_correction_rate"]
    assert 0.0 <= rate <= 1.0
    per_layer = out.stats["freekv_correction_rate_per_layer"]
    assert per_layer[0] is None and per_layer[1] == rate  # layer 0 dense, layer 1 FreeKV


def test_generate_with_offload_equals_on_device(tiny_lm):
    """Through the whole jitted decode loop (the host pool is carried by the loop), batch 2."""
    from kvjax import generate

    rng = np.random.default_rng(6)
    ids = [rng.integers(100, 49152, n).tolist() for n in (90, 61)]
    method = FreeKV(budget=48, page_size=8, sink=8, recent=16, tau=0.9)
    on_device = generate(tiny_lm, ids, method=method, max_new_tokens=8)
    offload = generate(tiny_lm, ids, method=dataclasses.replace(method, offload=True), max_new_tokens=8)
    assert offload.tokens == on_device.tokens
    assert offload.stats["host_kv_bytes"] > 0 and on_device.stats["host_kv_bytes"] == 0
    assert offload.stats["freekv_correction_rate"] == on_device.stats["freekv_correction_rate"]


# ----------------------------------------------------------------------------------------
# Offload: device slots + host pool


OFFLOAD_CASES = [
    (FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=0.1, dense_layers=0), [37, 20, 5], 14),
    (FreeKV(budget=40, page_size=8, sink=8, recent=16, tau=0.05, dense_layers=0), [70, 33, 5], 12),
    (FreeKV(budget=24, page_size=4, sink=0, recent=4, dense_layers=0, speculative=False), [45, 29], 11),
]


@pytest.mark.parametrize("method,lengths,steps", OFFLOAD_CASES, ids=["sink4", "page8", "nosink"])
def test_offload_equals_on_device(method, lengths, steps):
    seed = method.budget + method.recent
    ref = run_method(method, lengths, steps, seed=seed)[1]
    off = dataclasses.replace(method, offload=True)
    got = run_method(off, lengths, steps, seed=seed,
                     observe=lambda c, q, n: (np.asarray(c.slot_page), np.asarray(c.recalled)))[1]
    for (a, *_), (b, *_) in zip(ref, got):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=0)


@pytest.mark.parametrize("prefetch_pages", [None, 3], ids=["staging-1-page", "staging-all-k"])
def test_offload_copies_only_missing_pages(prefetch_pages):
    """Each step copies the pages its previous step staged (the speculative selection minus
    what was resident, up to the staging size) plus, synchronously, the selected pages still
    missing after that: for a head whose speculation held, exactly the selected pages that
    were not resident."""
    method = FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=0.1, dense_layers=0, offload=True,
                    prefetch_pages=prefetch_pages)
    lengths, steps = [37, 20, 5], 14
    observe = lambda c, q, n: tuple(np.asarray(x) for x in (
        c.slot_page, c.recalled, c.prefetched, c.staged_slot_page, c.next_pages, c.next_valid, c.has_prev))
    _, step_list, q, k, v = run_method(method, lengths, steps, seed=method.budget + method.recent, observe=observe)
    prefetched = exact = 0
    for before, after in zip(step_list, step_list[1:]):
        slot_page, recalled, ahead, staged_map, next_pages, next_valid, has_prev = before[2]
        copied = after[2][1] - recalled
        for b, c in enumerate(before[1]):
            for m in range(HKV):
                pages = set(np_step(q, k, b, c, c == lengths[b], method, m)[0])
                resident = set(slot_page[b, m].tolist())
                spec = set(next_pages[b, m][next_valid[b, m]].tolist()) if has_prev[b] else set()
                staged = min(len(spec - resident), method.staged_pages)
                assert after[2][2][b, m] - ahead[b, m] == staged
                assert copied[b, m] == staged + len(pages - set(staged_map[b, m].tolist()))
                if pages == spec:
                    assert copied[b, m] == len(pages - resident)
                    exact += 1
                assert pages <= set(after[2][0][b, m].tolist())  # resident after the step
                prefetched += staged
    assert prefetched > 0 and exact > 0


def test_offload_repeated_query_copies_nothing_after_the_first_step():
    method = FreeKV(budget=24, page_size=4, sink=4, recent=8, tau=0.8, dense_layers=0, offload=True)
    rng = np.random.default_rng(1)
    same = np.repeat(rng.standard_normal((1, HQ, D)).astype(np.float32), 3, axis=0)
    # Prompt 41: positions 41..43 stay in page 10, so the candidates do not change.
    one = _decode_with_queries(method, same[:1], prompt=41)
    three = _decode_with_queries(method, same, prompt=41)
    assert np.asarray(one.recalled).tolist() == [[method.top_pages] * HKV]
    np.testing.assert_array_equal(np.asarray(three.recalled), np.asarray(one.recalled))


def test_offload_device_bytes_do_not_grow_with_context():
    from kvjax import kv_bytes

    method = FreeKV(budget=48, page_size=8, sink=8, recent=16, dense_layers=0, offload=True)
    small, large = (init_cache(method, spec(2, n)).layers[0] for n in (128, 1024))
    for name in ("k", "v", "slot_page", "prev_q"):
        assert getattr(small, name).nbytes == getattr(large, name).nbytes, name
    assert small.k.shape[2] == method.budget
    assert small.pool.sharding.memory_kind == "pinned_host"
    assert large.pool.nbytes == 8 * small.pool.nbytes
    dev_small, host_small = kv_bytes(Cache(layers=(small,), lengths=jnp.zeros(2, jnp.int32)))
    dev_large, host_large = kv_bytes(Cache(layers=(large,), lengths=jnp.zeros(2, jnp.int32)))
    assert host_large == 8 * host_small
    # What still grows on the device is the per-page metadata (digests, scores): 1/P of it.
    kv_host = large.pool.nbytes
    assert dev_large - dev_small < kv_host / method.page_size


def test_offload_bfloat16_pool_recall_copies_blocks_without_converting_the_pool():
    """A bfloat16 pool is stored as its uint16 bits: the recall returns the exact blocks, and
    the compiled copy never converts the whole pool (XLA's CPU backend computes bfloat16 in
    float32 and hoisted that conversion of every page out of the copy loop)."""
    from kvjax.compat import host_bits, to_host

    method = FreeKV(budget=24, page_size=4, sink=4, recent=8, dense_layers=0, offload=True)
    rng = np.random.default_rng(7)
    pool_np = rng.standard_normal((2, 16, HKV, 2, 4, D)).astype(jnp.bfloat16)
    pool = to_host(host_bits(jnp.asarray(pool_np)))
    assert pool.dtype == jnp.uint16
    pages = jnp.asarray(rng.choice(16, (2, HKV, 3)), jnp.int32)
    missing = jnp.asarray(rng.random((2, HKV, 3)) < 0.6)
    target = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, HKV, 3))
    gather = jax.jit(lambda *a: method._gather(*a, jnp.bfloat16, pages.shape[2]))
    blocks, at = gather(pool, pages, missing, target)
    assert blocks.dtype == jnp.bfloat16 and blocks.shape == (2, HKV, 3, 2, 4, D)
    for b in range(2):
        for h in range(HKV):
            copied = np.flatnonzero(np.asarray(missing[b, h]))  # compacted per (sequence, head), in order
            for n, i in enumerate(copied):
                np.testing.assert_array_equal(np.asarray(blocks[b, h, n]), pool_np[b, int(pages[b, h, i]), h])
                assert int(at[b, h, n]) == method.sink + int(target[b, h, i]) * method.page_size
            assert (np.asarray(at[b, h, len(copied):]) == method.budget).all()  # unused entries
    hlo = gather.lower(pool, pages, missing, target).compile().as_text()
    assert f"f32[{','.join(map(str, pool_np.shape))}]" not in hlo
