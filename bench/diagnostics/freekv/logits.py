"""Per-step logits of pairs of methods, teacher-forced on the question and the expected
answer: logits.py SEED 'SPEC_A|SPEC_B'..."""
import sys
import time

import numpy as np
from sample import method, passkey, teacher_logits

s = passkey(int(sys.argv[1]))
model, tokens = s.model, s.tokens
print("expected", s.sample.answers, "teacher tokens", len(tokens), [model.tokenizer.decode([t]) for t in s.answer], flush=True)
n_q = len(s.question)
res = {}
for pair in sys.argv[2:]:
    a, b = pair.split('|')
    for spec in (a, b):
        if spec not in res:
            t0 = time.time(); res[spec] = teacher_logits(s, method(spec)); print(f"ran {spec} {time.time()-t0:.0f}s", flush=True)
    la, lb = res[a], res[b]
    diff = np.abs(la - lb).max(-1)
    agree = (la.argmax(-1) == lb.argmax(-1))
    print(f"{a} vs {b}: max|dlogit| per step {np.array2string(diff, precision=3, max_line_width=300)}")
    for name, lg in ((a, la), (b, lb)):
        top = np.argsort(lg[n_q - 1])[::-1][:2]
        print(f"   {name}: first answer step top-2 {[(model.tokenizer.decode([int(i)]), round(float(lg[n_q - 1, i]), 3)) for i in top]}")
    print(f"   argmax agree {agree.astype(int)}; argmax at answer steps A={[model.tokenizer.decode([i]) for i in la.argmax(-1)[n_q-1:]]} B={[model.tokenizer.decode([i]) for i in lb.argmax(-1)[n_q-1:]]}", flush=True)
