"""Greedy answers of methods on the passkey sample of a seed: run.py SEED SPEC..."""
import sys
import time

from sample import method, passkey

from bench.accuracy import decode
from kvjax.eval.runner import MAX_NEW_TOKENS
from kvjax.generation import convert
from kvjax.methods import Full

s = passkey(int(sys.argv[1]))
print("expected", s.sample.answers, "ctx", s.sample.context_tokens, "question len", len(s.question), flush=True)
for spec in sys.argv[2:]:
    m = method(spec)
    t0 = time.time()
    pre = s.dense if m == Full() else convert(s.dense, m)
    out = decode(s.model, pre, m, s.question, MAX_NEW_TOKENS["passkey"], s.shapes)
    print(f"{spec:60s} {out['text']!r}  ({time.time() - t0:.0f}s)", flush=True)
