import dataclasses, sys
sys.path.insert(0, '.'); sys.path.insert(0, __import__("os").path.dirname(__file__))
exec(open(__import__('os').path.join(__import__('os').path.dirname(__file__), 'logits.py')).read().split("n_q = len(question)")[0].replace("seed = int(sys.argv[1]); pairs = sys.argv[2:]", "seed = int(sys.argv[1]); pairs = []"))
p = prompts[0]
digits = model.tokenizer(sample.answers[0], add_special_tokens=False)["input_ids"]
pos = [i for i in range(len(p) - len(digits)) if p[i:i + len(digits)] == digits]
print("needle digit tokens at", pos, "pages(16)", [x // 16 for x in pos], [(x + len(digits) - 1) // 16 for x in pos])
needle = tuple(x + i for x in pos for i in range(len(digits)))
STEP = int(sys.argv[2])
for extra in sys.argv[3:]:
    m = eval(extra)
    m = dataclasses.replace(m, probe_at=len(p) + STEP, needle=needle)
    print("==", extra)
    run(m)
