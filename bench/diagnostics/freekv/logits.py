import sys, time
sys.path.insert(0, '.'); sys.path.insert(0, __import__("os").path.dirname(__file__))
import numpy as np, jax, jax.numpy as jnp
import models
from bench.accuracy import Shapes, QUESTION_BUCKET, depth_for
# Names the method specs on the command line are evaluated with:
from bench.method_speed import freekv  # noqa: F401
from kvjax.eval.tasks import make_sample
from kvjax.eval.runner import MAX_NEW_TOKENS
from kvjax.generation import _tokenize, convert, prefill
from kvjax.methods import Full, make_method  # noqa: F401
from kvjax import FreeKV  # noqa: F401
from models.llama import forward
from ref import RefFreeKV, RefSpecFreeKV  # noqa: F401

seed = int(sys.argv[1]); pairs = sys.argv[2:]
model = models.load("smollm2")
sample = make_sample("passkey", model.tokenizer, 4096, depth=depth_for(seed), seed=seed, haystack=None)
shapes = Shapes(QUESTION_BUCKET, MAX_NEW_TOKENS["passkey"])
_, prompts, questions = _tokenize(model.tokenizer, sample.context, sample.question)
question = questions[0]
dense = prefill(model, prompts, Full(), extra_tokens=shapes.extra_tokens(len(question)))
answer = model.tokenizer(" " + sample.answers[0] + ".", add_special_tokens=False)["input_ids"]
tokens = question + answer
print("expected", sample.answers, "teacher tokens", len(tokens), [model.tokenizer.decode([t]) for t in answer], flush=True)

step_fn = jax.jit(lambda params, tok, cache, method: forward(params, tok, cache.lengths[:, None], cache, method, config=model.config),
                  static_argnames=("method",))

def run(m):
    pre = convert(dense, m) if m != Full() else dense
    cache = jax.tree_util.tree_map(lambda x: x.copy() if hasattr(x, 'copy') else x, pre.cache)
    logits = []
    for t in tokens:
        lg, cache = step_fn(model.params, jnp.array([[t]], jnp.int32), cache, m)
        logits.append(np.asarray(lg[0, 0], np.float32))
    return np.stack(logits)

n_q = len(question)
res = {}
for pair in pairs:
    a, b = pair.split('|')
    for s in (a, b):
        if s not in res:
            t0 = time.time(); res[s] = run(eval(s)); print(f"ran {s} {time.time()-t0:.0f}s", flush=True)
    la, lb = res[a], res[b]
    diff = np.abs(la - lb).max(-1)
    agree = (la.argmax(-1) == lb.argmax(-1))
    print(f"{a} vs {b}: max|dlogit| per step {np.array2string(diff, precision=3, max_line_width=300)}")
    for name, lg in ((a, la), (b, lb)):
        top = np.argsort(lg[n_q - 1])[::-1][:2]
        print(f"   {name}: first answer step top-2 {[(model.tokenizer.decode([int(i)]), round(float(lg[n_q - 1, i]), 3)) for i in top]}")
    print(f"   argmax agree {agree.astype(int)}; argmax at answer steps A={[model.tokenizer.decode([i]) for i in la.argmax(-1)[n_q-1:]]} B={[model.tokenizer.decode([i]) for i in lb.argmax(-1)[n_q-1:]]}", flush=True)
