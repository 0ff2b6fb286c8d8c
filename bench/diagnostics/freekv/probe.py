"""Needle-page ranks per layer and head at one decode step: probe.py SEED STEP SPEC...
(STEP 0 = the first question token; SPEC a reference method, e.g. 'RefFreeKV()', whose
`probe_at`/`needle` fields make it print what it selects around the needle)."""
import dataclasses
import sys

from sample import method, passkey, teacher_logits

s = passkey(int(sys.argv[1]))
p = s.prompts[0]
digits = s.model.tokenizer(s.sample.answers[0], add_special_tokens=False)["input_ids"]
pos = [i for i in range(len(p) - len(digits)) if p[i:i + len(digits)] == digits]
print("needle digit tokens at", pos, "pages(16)", [x // 16 for x in pos], [(x + len(digits) - 1) // 16 for x in pos])
needle = tuple(x + i for x in pos for i in range(len(digits)))
step = int(sys.argv[2])
for spec in sys.argv[3:]:
    print("==", spec)
    teacher_logits(s, dataclasses.replace(method(spec), probe_at=len(p) + step, needle=needle))
