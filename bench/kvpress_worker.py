"""kvpress side of `bench/vs_kvpress.py`: runs inside the kvpress virtual environment.

Imports only torch, transformers and kvpress (never kvjax: this interpreter does not have it).
Reads the prompts that `vs_kvpress.py` dumped (token ids, so both sides see identical tokens),
answers every prompt with Full and with each press at each kept-token budget, and appends one
JSON line per prompt to the output file (generated token ids, timings), so a run cut short keeps
what it did and a rerun skips what is already there.

Protocol per prompt, as kvpress's own pipeline (`KVPressTextGenerationPipeline._forward`):
the context is prefilled through `model.model` with the press's forward hooks compressing each
layer's cache, the question is fed as one chunk with position ids continuing from the original
context length, then greedy decoding. To afford many presses per prompt on a CPU the context is
prefilled once, densely, while each attention layer's hook inputs are recorded; each press then
runs its own `forward_hook` (inside its own `press(model)` context) on those recorded inputs and
a fresh copy of the dense cache. That is the same computation as a prefill per press, because a
press compresses a layer only after the layer's attention output is computed, so every layer sees
the same uncompressed inputs; `replay_check` verifies it on a prefix of the first prompt.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = ("snapkv", "streaming_llm", "expected_attention", "keydiff")


def log(*args: Any) -> None:
    print("[kvpress]", *args, file=sys.stderr, flush=True)


def make_press(name: str, budget: int, context_len: int):
    """A kvpress press that keeps `budget` of `context_len` context tokens per head and layer.

    kvpress 0.5 has no fixed-budget option for these presses: they take `compression_ratio`
    and keep `int(k_len * (1 - ratio))` tokens, so the ratio is `1 - (budget + 0.5) / k_len`
    (the half token guards the truncation against float rounding).
    """
    from kvpress import ExpectedAttentionPress, KeyDiffPress, SnapKVPress, StreamingLLMPress

    ratio = 1.0 - (budget + 0.5) / context_len
    presses = {"snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress,
               "expected_attention": ExpectedAttentionPress, "keydiff": KeyDiffPress}
    if name not in presses:
        raise ValueError(f"unknown press {name!r}; expected one of {PRESSES}")
    return presses[name](compression_ratio=ratio)


def load_model(gguf: Path):
    """The GGUF file through transformers' own GGUF loader (dequantized to float32)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar line per tensor would flood the worker log
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def dense_prefill(model, context_ids: list[int]):
    """Prefill `context_ids` densely; returns (cache, per-layer recorded hook inputs, seconds)."""
    layers = model.model.layers
    recorded: list[dict[str, Any]] = [{} for _ in layers]

    def recorder(i: int):
        def hook(module, args, kwargs, output):
            recorded[i] = {"kwargs": {k: v for k, v in kwargs.items() if k != "past_key_values"},
                           "attentions": output[1]}
            return output
        return hook

    hooks = [layer.self_attn.register_forward_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(layers)]
    cache = DynamicCache()
    try:
        t0 = time.perf_counter()
        model.model(input_ids=torch.tensor([context_ids]), past_key_values=cache)
        seconds = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    return cache, recorded, seconds


def compress(model, press, dense: DynamicCache, recorded: list[dict[str, Any]]) -> DynamicCache:
    """A new cache: the dense one compressed by `press`'s own forward hook, layer by layer."""
    cache = DynamicCache()
    for i, layer in enumerate(dense.layers):
        cache.update(layer.keys, layer.values, i)  # a copy (DynamicLayer.update concatenates)
    with press(model):  # sets what the press needs on the modules (rotary_emb, post_init_from_model)
        for i, layer in enumerate(model.model.layers):
            kwargs = {**recorded[i]["kwargs"], "past_key_values": cache}
            press.forward_hook(layer.self_attn, [], kwargs, (None, recorded[i]["attentions"]))
    return cache


def generate(model, cache: DynamicCache, context_len: int, question_ids: list[int], max_new: int,
             eos: set[int]) -> dict[str, Any]:
    """Question as one chunk, then greedy decoding (kvpress's `generate_answer`), timed per step."""
    position = torch.arange(context_len, context_len + len(question_ids)).unsqueeze(0)
    t0 = time.perf_counter()
    out = model(input_ids=torch.tensor([question_ids]), past_key_values=cache, position_ids=position,
                logits_to_keep=1)
    question_s = time.perf_counter() - t0
    tokens = [int(out.logits[0, -1].argmax())]
    step_s: list[float] = []
    pos = context_len + len(question_ids)
    while len(tokens) < max_new and tokens[-1] not in eos:
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, position_ids=torch.tensor([[pos]]))
        tokens.append(int(out.logits[0, -1].argmax()))
        step_s.append(time.perf_counter() - t0)
        pos += 1
    return {"tokens": tokens, "question_s": round(question_s, 4), "step_s": [round(s, 5) for s in step_s]}


def replay_check(model, context_ids: list[int], presses: list[str], budget: int) -> dict[str, Any]:
    """Replay vs kvpress's own path (a prefill under `with press(model)`) on a context prefix:
    max |difference| of the kept keys and values, per press."""
    dense, recorded, _ = dense_prefill(model, context_ids)
    report = {"context_tokens": len(context_ids), "budget": budget}
    for name in presses:
        press = make_press(name, budget, len(context_ids))
        replayed = compress(model, press, dense, recorded)
        hooked = DynamicCache()
        with press(model):
            model.model(input_ids=torch.tensor([context_ids]), past_key_values=hooked)
        diff = max(max((a.keys - b.keys).abs().max().item(), (a.values - b.values).abs().max().item())
                   if a.keys.shape == b.keys.shape else float("inf")
                   for a, b in zip(replayed.layers, hooked.layers))
        report[name] = diff
        log(f"replay check {name}: max |kept K/V difference| {diff:.2e}")
    return report


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                           "cpus": sorted(os.sched_getaffinity(0))}
    for name in ("kvpress", "torch", "transformers", "gguf", "numpy", "accelerate"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=Path, required=True, help="JSON written by vs_kvpress.py")
    p.add_argument("--output", type=Path, required=True, help="JSON-lines file, appended to")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpus", type=int, nargs="*", default=None, help="CPU affinity (default: unchanged)")
    p.add_argument("--logits-out", type=Path, default=None, help=".npy: last-position logits of the check prefix")
    p.add_argument("--check-tokens", type=int, default=1024, help="prefix length of the replay check (0: none)")
    args = p.parse_args(argv)

    if args.cpus:
        os.sched_setaffinity(0, args.cpus)
    torch.set_num_threads(args.threads)
    spec = json.loads(args.prompts.read_text())
    budgets, presses, eos = spec["budgets"], spec["presses"], set(spec["eos_token_ids"])
    done = set()
    if args.output.is_file():
        for line in args.output.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "sample":
                done.add(rec["id"])
    t0 = time.perf_counter()
    model = load_model(Path(spec["gguf"]))
    log(f"model loaded in {time.perf_counter() - t0:.0f} s; {len(spec['prompts']) - len(done)} prompts to do")

    def emit(record: dict[str, Any]) -> None:
        with args.output.open("a") as f:
            f.write(json.dumps(record) + "\n")

    with torch.inference_mode():
        if not done:
            emit({"type": "environment", **versions()})
            check = spec["check_ids"]
            if args.logits_out is not None:
                import numpy as np

                logits = model(input_ids=torch.tensor([check])).logits[0, -1].float().numpy()
                np.save(args.logits_out, logits)
            if args.check_tokens > 0 and spec["prompts"]:
                ids = spec["prompts"][0]["context_ids"][: args.check_tokens]
                emit({"type": "replay_check", **replay_check(model, ids, presses, min(budgets))})
        for n, prompt in enumerate(spec["prompts"]):
            if prompt["id"] in done:
                continue
            t_sample = time.perf_counter()
            ctx, question, max_new = prompt["context_ids"], prompt["question_ids"], prompt["max_new"]
            dense, recorded, prefill_s = dense_prefill(model, ctx)
            results: dict[str, Any] = {}
            for name in presses:
                for budget in budgets:
                    t1 = time.perf_counter()
                    cache = compress(model, make_press(name, budget, len(ctx)), dense, recorded)
                    compress_s = time.perf_counter() - t1
                    kept = cache.layers[0].keys.shape[2]
                    results[f"{name}/{budget}"] = {**generate(model, cache, len(ctx), question, max_new, eos),
                                                   "compress_s": round(compress_s, 4), "kept": kept}
                    del cache
            del recorded
            results["full"] = {**generate(model, dense, len(ctx), question, max_new, eos), "compress_s": 0.0,
                               "kept": len(ctx)}
            emit({"type": "sample", "id": prompt["id"], "prefill_s": round(prefill_s, 3),
                  "wall_s": round(time.perf_counter() - t_sample, 2), "results": results})
            log(f"[{n + 1}/{len(spec['prompts'])}] {prompt['id']} prefill {prefill_s:.0f} s, "
                f"total {time.perf_counter() - t_sample:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
