"""Plain jnp reference of ALGORITHMS.md section 4 (non-speculative selection), dense cache."""
import dataclasses
import jax, jax.numpy as jnp
from kvjax.methods.full import Full, DenseLayerCache
from kvjax.methods.base import write_token
from kvjax.attention import decode_attention

@dataclasses.dataclass(frozen=True)
class RefFreeKV(Full):
    budget: int = 1024
    page_size: int = 16
    sink: int = 128
    recent: int = 256
    dense_layers: int = 1
    debug: bool = False
    probe_at: int = -1
    temp: float = 1.0
    needle: tuple = ()
    name = "ref_freekv"

    def attend(self, layer, cache, q, k, v, lengths):
        if layer < self.dense_layers:
            return Full.attend(self, layer, cache, q, k, v, lengths)
        return self._attend_with(layer, cache, q, q, k, v, lengths)

    def _attend_with(self, layer, cache, q, qsel, k, v, lengths):
        k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
        P = self.page_size
        b, hkv, S, d = cache.k.shape
        hq = q.shape[1]; G = hq // hkv
        npg = S // P
        L = lengths[:, None]  # [B,1]
        r0 = jnp.maximum(L // P - self.recent // P + 1, 0)
        j = jnp.arange(npg)[None]
        cand = (j >= self.sink // P) & (j < r0)  # [B, npg]
        kp = cache.k[:, :, : npg * P].astype(jnp.float32).reshape(b, hkv, npg, P, d)
        lo, hi = kp.min(3), kp.max(3)
        qg = qsel.astype(jnp.float32).reshape(b, hkv, G, 1, d)
        bound = jnp.maximum(qg * lo[:, :, None], qg * hi[:, :, None]).sum(-1)  # [B,hkv,G,npg]
        bound = jnp.where(cand[:, None, None], bound, -jnp.inf)
        sm = jax.nn.softmax(bound * self.temp, axis=-1)
        sm = jnp.where(cand[:, None, None], sm, 0.0)
        score = jnp.where(cand[:, None], sm.mean(2), -jnp.inf)  # [B,hkv,npg]
        ktop = (self.budget - self.sink - self.recent) // P
        best, pages = jax.lax.top_k(score, ktop)
        if self.debug:
            jax.debug.print('L{l} len={n} zero-selected={z} pos-cands={c} ncand={nc} maxbound={mb}', l=layer, n=lengths[0], z=(best == 0).sum(-1), c=(score > 0).sum(-1), nc=cand.sum(), mb=jnp.where(jnp.isfinite(bound), bound, -1e9).max(-1).max(-1)-jnp.where(jnp.isfinite(bound), bound, 1e9).min(-1).min(-1))
        sel = jnp.zeros((b, hkv, npg), bool).at[jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None], pages].max(best > -jnp.inf)
        pos = jnp.arange(S)[None, None]
        keep = jnp.repeat(sel, P, axis=2)[:, :, :S]
        keep = keep | (pos < jnp.minimum(self.sink, r0 * P)[:, :, None]) | (pos >= (r0 * P)[:, :, None])
        keep = keep & (pos < L[:, :, None])
        if self.probe_at >= 0:
            def show(L0, sel, keep, r0, cache_k, q, bound_all, score_all):
                import numpy as np
                if int(L0[0]) != self.probe_at:
                    return
                sel, keep = np.asarray(sel[0]), np.asarray(keep[0])
                pages = sorted({p // P for p in self.needle})
                qq = np.asarray(q[0], np.float64); kk = np.asarray(cache_k[0], np.float64)[:, :int(L0[0])]
                s = np.einsum('hgd,hsd->hgs', qq.reshape(hkv, G, d), kk) / np.sqrt(d)
                w = np.exp(s - s.max(-1, keepdims=True)); w /= w.sum(-1, keepdims=True)
                cover = (w * keep[:, None, :int(L0[0])]).sum(-1)  # [hkv, G]
                needle_mass = w[..., list(self.needle)].sum(-1)
                if needle_mass.max() < 0.3:
                    return
                hb, gb = np.unravel_index(needle_mass.argmax(), needle_mass.shape)
                bq = np.asarray(bound_all[0], np.float64)  # [hkv, G, npg]
                sc = np.asarray(score_all[0], np.float64)
                rank = lambda row, pg: int((row > row[pg]).sum())
                extra = f" | head kv{hb}/q{gb}: own-bound rank of pages {pages}: {[rank(bq[hb, gb], pg) for pg in pages]}, group-score rank {[rank(sc[hb], pg) for pg in pages]} (k={ktop}); other heads' bound rank {[[rank(bq[hb, g], pg) for pg in pages] for g in range(G)]}"
                print(f"layer {layer:2d} r0={int(r0[0,0])} needle pages {pages} selected per kv head {[[int(sel[h, p]) for p in pages] for h in range(hkv)]}; "
                      f"full-attn mass kept min/mean {cover.min():.2f}/{cover.mean():.2f}; needle mass (full) max head {needle_mass.max():.3f} kept-by-that-head {int(keep[needle_mass.max(1).argmax(), self.needle[0]])}" + extra, flush=True)
            jax.debug.callback(show, lengths, sel, keep, r0, cache.k, q, bound, score)
        out = decode_attention(q, cache.k, cache.v, keep, current=(k, v))
        return out, DenseLayerCache(write_token(cache.k, lengths, k), write_token(cache.v, lengths, v))


from flax import struct
from kvjax.methods.base import write_prompt

@struct.dataclass
class RefCache:
    k: jax.Array
    v: jax.Array
    prev_q: jax.Array
    has_prev: jax.Array


@dataclasses.dataclass(frozen=True)
class RefSpecFreeKV(RefFreeKV):
    """Speculative reference: select with q_{t-1} unless the group cosine < tau."""
    tau: float = 0.8
    name = "ref_spec_freekv"

    def init_cache(self, layer, spec):
        c = Full.init_cache(self, layer, spec)
        if layer < self.dense_layers:
            return c
        return RefCache(c.k, c.v, jnp.zeros((spec.batch, spec.num_heads, spec.head_dim), jnp.float32),
                        jnp.zeros((spec.batch,), bool))

    def ingest(self, layer, cache, k, v, lengths):
        if layer < self.dense_layers:
            return Full.ingest(self, layer, cache, k, v, lengths)
        return RefCache(write_prompt(cache.k, k), write_prompt(cache.v, v), jnp.zeros_like(cache.prev_q),
                        jnp.zeros_like(cache.has_prev))

    def attend(self, layer, cache, q, k, v, lengths):
        if layer < self.dense_layers:
            return Full.attend(self, layer, cache, q, k, v, lengths)
        b, hq, d = q.shape
        hkv = cache.k.shape[1]; G = hq // hkv
        qf = q.astype(jnp.float32)
        n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        c = (n(qf) * n(cache.prev_q)).sum(-1).reshape(b, hkv, G).mean(-1)
        fresh = (c < self.tau) | ~cache.has_prev[:, None]  # [B, hkv]
        if self.probe_at >= 0 and layer in (17, 18):
            jax.debug.print('layer {l} len {n}: group cos c={c}', l=layer, n=lengths[0], c=c[0])
        qsel = jnp.where(jnp.repeat(fresh, G, axis=1)[..., None], qf, cache.prev_q)
        out, dense = self._attend_with(layer, DenseLayerCache(cache.k, cache.v), q, qsel, k, v, lengths)
        return out, RefCache(dense.k, dense.v, qf, jnp.ones_like(cache.has_prev))
