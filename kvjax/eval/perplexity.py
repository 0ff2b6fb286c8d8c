"""Perplexity fidelity: how much a compressed cache changes next-token predictions.

For a long text, the first `context_tokens` tokens are prefilled; each of the next `score_tokens`
tokens is then scored by one compressed decode step (teacher forcing: the true token is fed
back). Perplexity under a method is compared with the dense (`Full`) perplexity of the same
positions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import Cache
from kvjax.checks import check_count
from kvjax.generation import check_finite_logits, check_model, check_token_ids, compiled, prefill
from kvjax.methods import Method
from kvjax.methods.base import check_method
from models.bundle import Model
from models.config import ModelConfig
from models.llama import forward
from models.params import Params


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    method: dict
    context_tokens: int
    score_tokens: int
    nll: float  # mean negative log-likelihood (nats) of the scored tokens
    perplexity: float
    seconds: float


def _teacher_forced_nll(
    params: Params, cache: Cache, first_logits, targets, *, config: ModelConfig, method: Method
):
    """NLL of targets[:, i] given everything before it; one decode step per target after the first."""

    def nll(logits, target):
        return -jax.nn.log_softmax(logits, axis=-1)[jnp.arange(target.shape[0]), target]

    def step(carry, target_pair):
        cache, _ = carry
        fed, target = target_pair
        logits, cache = forward(params, fed[:, None], cache.lengths[:, None], cache, method, config=config)
        return (cache, 0), nll(logits[:, 0], target)

    first = nll(first_logits, targets[:, 0])
    pairs = (targets[:, :-1].T, targets[:, 1:].T)  # feed token i, score token i+1
    (_, _), rest = jax.lax.scan(step, (cache, 0), pairs)
    return jnp.concatenate([first[None], rest], axis=0).T  # [B, n]


_nll_jit = jax.jit(_teacher_forced_nll, static_argnames=("config", "method"))


def load_text_tokens(model: Model, path: str | Path, limit: int) -> list[int]:
    """Tokenize the start of a text file (enough characters for `limit` tokens)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    chars = min(len(text), limit * 8)  # generous: English runs ~4 characters per token
    ids = model.tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
    if len(ids) < limit:
        raise ValueError(f"{path} holds {len(ids)} tokens, fewer than the {limit} needed")
    return list(ids[:limit])


def perplexity(
    model: Model, tokens: list[int], method: Method, context_tokens: int, score_tokens: int
) -> PerplexityResult:
    """Perplexity of tokens[context_tokens : context_tokens + score_tokens] under `method`.

    Raises FloatingPointError naming the first scored token whose logits held a NaN or Inf
    (a mean over them would be NaN, which compares as neither better nor worse than `Full`)."""
    check_model(model)
    check_method(method)
    check_count("context_tokens", context_tokens)
    check_count("score_tokens", score_tokens)
    check_token_ids("tokens", [tokens], model.config.vocab_size)
    if len(tokens) < context_tokens + score_tokens:
        raise ValueError(
            f"need {context_tokens + score_tokens} tokens (context_tokens + score_tokens), got {len(tokens)}"
        )
    t0 = time.perf_counter()
    pre = prefill(model, [tokens[:context_tokens]], method, extra_tokens=score_tokens)
    targets = jnp.asarray([tokens[context_tokens : context_tokens + score_tokens]], jnp.int32)
    args = (model.params, pre.cache, pre.first_logits, targets)
    exe, _ = compiled(_nll_jit, args, config=model.config, method=method)
    per_token = np.asarray(exe(*args))  # [1, score_tokens]
    finite = np.isfinite(per_token)
    check_finite_logits(np.where(finite.all(axis=1), -1, np.argmin(finite, axis=1)), method)
    nll = float(per_token.mean())
    return PerplexityResult(
        method=method.describe(),
        context_tokens=context_tokens,
        score_tokens=score_tokens,
        nll=nll,
        perplexity=math.exp(nll),
        seconds=time.perf_counter() - t0,
    )
