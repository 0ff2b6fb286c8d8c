"""The passkey sample the diagnostics share: SmolLM2, 4096 tokens, `bench/accuracy.py`'s
prompt for a seed, one dense prefill; and teacher-forced logits of a method over the question
and the expected answer. Method specs given on the command line are evaluated with `method`."""
import os
import sys
import types

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(__file__))

import jax
import jax.numpy as jnp
import numpy as np

import models
from bench.accuracy import QUESTION_BUCKET, Shapes, depth_for
from bench.method_speed import freekv
from kvjax import FreeKV
from kvjax.eval.runner import MAX_NEW_TOKENS
from kvjax.eval.tasks import make_sample
from kvjax.generation import _tokenize, convert, prefill
from kvjax.methods import Full, make_method
from models.llama import forward
from ref import RefFreeKV, RefSpecFreeKV

SPEC_NAMES = dict(freekv=freekv, FreeKV=FreeKV, Full=Full, make_method=make_method, RefFreeKV=RefFreeKV,
                  RefSpecFreeKV=RefSpecFreeKV)


def method(spec: str):
    """A method from a spec such as 'freekv(1024,page_size=16,tau=0.9)' or 'RefFreeKV()'."""
    return eval(spec, SPEC_NAMES)


def passkey(seed: int) -> types.SimpleNamespace:
    """model, sample, shapes, prompts, question (ids), dense (the prefill) and tokens (the
    question then the expected answer, for teacher forcing)."""
    model = models.load("smollm2")
    sample = make_sample("passkey", model.tokenizer, 4096, depth=depth_for(seed), seed=seed, haystack=None)
    shapes = Shapes(QUESTION_BUCKET, MAX_NEW_TOKENS["passkey"])
    _, prompts, questions = _tokenize(model.tokenizer, sample.context, sample.question)
    question = questions[0]
    dense = prefill(model, prompts, Full(), extra_tokens=shapes.extra_tokens(len(question)))
    answer = model.tokenizer(" " + sample.answers[0] + ".", add_special_tokens=False)["input_ids"]
    return types.SimpleNamespace(model=model, sample=sample, shapes=shapes, prompts=prompts, question=question,
                                 dense=dense, answer=answer, tokens=question + answer)


def teacher_logits(s: types.SimpleNamespace, m) -> np.ndarray:
    """Logits [steps, V] of method `m` fed `s.tokens` one by one after the prefill."""
    step = jax.jit(lambda params, tok, cache, method: forward(params, tok, cache.lengths[:, None], cache, method,
                                                              config=s.model.config), static_argnames=("method",))
    cache = (s.dense if m == Full() else convert(s.dense, m)).cache
    cache = jax.tree_util.tree_map(lambda x: x.copy() if hasattr(x, "copy") else x, cache)  # the prefill is reused
    logits = []
    for t in s.tokens:
        lg, cache = step(s.model.params, jnp.array([[t]], jnp.int32), cache, m)
        logits.append(np.asarray(lg[0, 0], np.float32))
    return np.stack(logits)
