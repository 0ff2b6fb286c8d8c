import sys, time
sys.path.insert(0, '.')
import models
from bench.accuracy import Shapes, QUESTION_BUCKET, decode, depth_for
# Names the method specs on the command line are evaluated with:
from bench.method_speed import freekv  # noqa: F401
from kvjax.eval.tasks import make_sample
from kvjax.eval.runner import MAX_NEW_TOKENS
from kvjax.generation import _tokenize, convert, prefill
from kvjax.methods import Full, make_method  # noqa: F401
from kvjax import FreeKV  # noqa: F401
sys.path.insert(0, __import__("os").path.dirname(__file__)); from ref import RefFreeKV  # noqa: F401

seed = int(sys.argv[1]); specs = sys.argv[2:]
model = models.load("smollm2")
sample = make_sample("passkey", model.tokenizer, 4096, depth=depth_for(seed), seed=seed, haystack=None)
shapes = Shapes(QUESTION_BUCKET, MAX_NEW_TOKENS["passkey"])
_, prompts, questions = _tokenize(model.tokenizer, sample.context, sample.question)
q = questions[0]
print("expected", sample.answers, "ctx", sample.context_tokens, "question len", len(q), flush=True)
dense = prefill(model, prompts, Full(), extra_tokens=shapes.extra_tokens(len(q)))
for s in specs:
    m = eval(s)
    t0 = time.time()
    pre = dense if m == Full() else convert(dense, m)
    out = decode(model, pre, m, q, MAX_NEW_TOKENS["passkey"], shapes)
    print(f"{s:60s} {out['text']!r}  ({time.time()-t0:.0f}s)", flush=True)
