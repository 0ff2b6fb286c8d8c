"""Streaming video memory and time to first token: LiveVLM vs FullVideo vs ReKV, side by side.

ALGORITHMS.md section 5 item 7. Methods compared with each other stream the same frames in one
run, clip by clip (clips of 8 frames, a short-term FIFO of 16 frames, LiveVLM's default M):
LiveVLM beside FullVideo (and beside a LiveVLM session frozen at 64 frames), then LiveVLM beside
ReKV. After every clip the device and host KV bytes of each stream's memory are recorded; at
every checkpoint (64 ... 1024 frames) so is the time to first token of a question
(`StreamSession.first_token`: retrieval, the question prefill and the first token; one untimed
call each, then the median of `--repeats` calls, interleaved between the sessions so that
other load on the machine hits them alike). After FullVideo's last checkpoint LiveVLM streams
on alone to `--live-frames`.

Frames that fit in a fixed device memory: the budget is LiveVLM's own (bounded) KV memory.
FullVideo fits the frames it had streamed before its KV outgrew it (its buffers grow in powers
of two), and at most `budget / KV bytes per frame` with buffers of exactly its tokens. LiveVLM's
memory stays at the budget for the whole stream, so its count is the stream's length: a lower
bound.

Configurations (random weights: memory and speed do not depend on them):

- `tiny`: the tests' tiny LLaVA-OneVision (SigLIP 30 px, 16 tokens per frame; Qwen2 with 2
  layers, hidden 64), end to end: random uint8 frames through the vision tower and every layer.
- `0.5b`: LLaVA-OneVision-0.5B's language model (Qwen2-0.5B: hidden 896, 24 layers, 14 query /
  2 KV heads, head dim 64, intermediate 4864, vocabulary 151936, 32k positions) at 196 tokens
  per frame, float32 (XLA's CPU emulates bfloat16 matmuls: 6x slower; `--dtype bfloat16` halves
  the memory figures). Encoding a clip through it takes about a minute on a 2-core CPU, so the
  vision tower and the clip prefill are skipped: each clip's keys/values (and, for LiveVLM's
  compression, the attention scores) are random, and they go through the methods' own memory
  update (`kvjax.stream_forward.advance_layer`: the FIFO, VSB compression, host offload). The
  question pass that is timed is the real model's over that memory.

A word-hashing tokenizer stands in for the real one (the tokens are ids only).

    .venv/bin/python -m bench.stream                 # both configurations, 64 ... 1024 frames
    .venv/bin/python -m bench.stream --reduced       # a few minutes: fewer frames and 4 layers
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kvjax.stream_forward import advance_layer, finish_clip_jit  # noqa: E402

CONFIGS = ("tiny", "0.5b")
CLIP_FRAMES = 8  # every method's default clip
REFERENCE = "livevlm@64"  # a LiveVLM session frozen at 64 frames, timed beside the streaming one
QUESTION = "What is the person in the red jacket holding right now?"
INIT_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
FRAMES = [64, 128, 256, 512, 1024]
# LiveVLM streams on to 44x (the paper's figure) the frames FullVideo's KV fits into LiveVLM's
# device memory, rounded up: about 256 (tiny) and 87 (0.5b) frames.
LIVE_FRAMES = {"tiny": 12288, "0.5b": 4096}
REDUCED = dict(frames=[64, 128, 256], live_frames=1024, layers=4, repeats=3)


class WordTokenizer:
    """Stands in for a tokenizer: each whitespace-separated word hashes to an id."""

    chat_template = None
    eos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [zlib.crc32(w.encode()) % self.vocab_size for w in text.split()]}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def tiny_model():
    """The tests' tiny LLaVA-OneVision shape with random weights (`tests/hf_tiny_llava.py`)."""
    from models import llava_onevision as llava
    from models import siglip
    from models.config import ModelConfig
    from models.vision_bundle import VisionLanguageModel
    from models.vision_preprocess import PreprocessConfig

    text = ModelConfig(architecture="qwen2", vocab_size=211, hidden_size=64, intermediate_size=112, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096, attention_bias=True)
    vision = siglip.SiglipConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, image_size=30,
                                 patch_size=4)
    config = llava.LlavaOnevisionConfig(text=text, vision=vision)
    params = llava.init_random(config, jax.random.key(0))
    return VisionLanguageModel(config=text, params=params.text, tokenizer=WordTokenizer(text.vocab_size),
                               name="llava-onevision-tiny-random", llava_config=config, llava_params=params,
                               preprocess=PreprocessConfig(size=(30, 30), image_mean=(0.5,) * 3, image_std=(0.5,) * 3))


def qwen2_05b_model(layers: int, dtype: str):
    """LLaVA-OneVision-0.5B's Qwen2-0.5B language model with random weights."""
    from models.bundle import Model
    from models.config import ModelConfig
    from models.params import init_random

    config = ModelConfig(architecture="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=layers, num_heads=14, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                         rope_theta=1e6, max_position_embeddings=32768, attention_bias=True, tie_word_embeddings=True)
    params = init_random(config, jax.random.key(0), dtype=jnp.dtype(dtype))
    return Model(config=config, params=params, tokenizer=WordTokenizer(config.vocab_size),
                 name=f"qwen2-0.5b-shape-{layers}-layers-random-{dtype}")


def make_method(name: str):
    from kvjax import FullVideo, LiveVLM, ReKV

    return {"livevlm": LiveVLM, "fullvideo": FullVideo, "rekv": ReKV}[name]()


def _random_layer(layer, state, key, frame, *, method, layout):
    """One layer's memory after a clip of random pre-RoPE keys/values (and attention scores)."""
    hkv, d, t = layout.num_kv_heads, layout.head_dim, frame.shape[0]
    kk, kv, ks = jax.random.split(key, 3)
    k = jax.random.normal(kk, (hkv, t, d), layout.dtype)
    v = jax.random.normal(kv, (hkv, t, d), layout.dtype)
    long_scores = fifo_scores = None
    if method.needs_scores:
        scores = jax.random.uniform(ks, (layer.long_k.shape[1] + layer.short_k.shape[1] + t,))
        long_scores, fifo_scores = scores[: layer.long_k.shape[1]], scores[layer.long_k.shape[1]:]
    return advance_layer(layer, state, k, v, frame, long_scores, fifo_scores, method=method, layout=layout)


_random_layer_jit = jax.jit(_random_layer, static_argnames=("method", "layout"), donate_argnames=("layer",))


def advance_random(session, seed: int) -> None:
    """Stream one clip of random keys/values into `session`: its method's memory update runs
    layer by layer as in `kvjax.stream_forward.encode_clip`, without the transformer."""
    method, layout = session.method, session.layout
    frame = jnp.asarray(np.repeat(session.frames + np.arange(method.clip_frames), layout.frame_tokens), jnp.int32)
    state = method.grow(session.state, layout)
    meta = state.replace(layers=())
    keys = jax.random.split(jax.random.key(seed), len(state.layers))
    layers = tuple(_random_layer_jit(layer, meta, key, frame, method=method, layout=layout)
                   for layer, key in zip(state.layers, keys))
    session.state = jax.block_until_ready(finish_clip_jit(meta, frame, method=method, layout=layout)
                                          .replace(layers=layers))
    session.frames += method.clip_frames
    session.stream_tokens += int(frame.shape[0])


@dataclasses.dataclass
class Stream:
    """One session of a side-by-side run, streamed until `stop` frames; then dropped (its
    memory freed) or, with `keep`, kept frozen as a reference measured at later checkpoints."""

    label: str
    session: Any
    stop: int
    keep: bool = False


def interleaved_ttft(streams: list[Stream], repeats: int) -> dict[str, list[float]]:
    """First-token times of each session, interleaved (the order rotating every repeat) after
    one untimed call each (compilation, first-run set-up)."""
    for s in streams:
        s.session.first_token(QUESTION)
    runs: dict[str, list[float]] = {s.label: [] for s in streams}
    for r in range(repeats):
        for s in streams[r % len(streams):] + streams[: r % len(streams)]:
            runs[s.label].append(s.session.first_token(QUESTION).stats["ttft_s"])
    return runs


def point(session, checkpoint: int, ttft_runs: list[float]) -> dict[str, Any]:
    """A session's memory and first-token times at a checkpoint (a frozen session has fewer frames)."""
    m = session.memory_stats()
    return {"checkpoint": checkpoint, "frames": session.frames, "device_kv_bytes": m["device_kv_bytes"], "host_kv_bytes": m["host_kv_bytes"],
            "long_term_tokens": m["long_term_tokens"], "short_term_tokens": m["short_term_tokens"],
            "stream_tokens": m["stream_tokens"], "encode_s": m["encode_s"],
            "ttft_s": statistics.median(ttft_runs) if ttft_runs else None, "ttft_runs_s": ttft_runs}


def run_side_by_side(model, streams: list[Stream], checkpoints: set[int], synthetic: bool, repeats: int,
                     max_ttft_gib: float, out: dict, save, desc: str) -> None:
    """Stream the same frames into every session, clip by clip, until each one's `stop`. After
    every clip record the sessions' KV bytes; at each checkpoint their memory and time to first
    token, timed interleaved so that other load on the machine hits all alike (sessions whose
    device KV exceeds `max_ttft_gib` are not timed)."""
    from tqdm import tqdm

    points, per_clip = out.setdefault("points", {}), out.setdefault("memory_per_clip", {})
    rng = np.random.default_rng(0)
    active = list(streams)
    for i in tqdm(range(max(s.stop for s in streams) // CLIP_FRAMES), desc=desc, file=sys.stderr):
        frames = (i + 1) * CLIP_FRAMES
        if not synthetic:
            size = model.llava_config.vision.image_size
            pixels = rng.integers(0, 256, (CLIP_FRAMES, size, size, 3), dtype=np.uint8)
        for s in active:
            if s.session.frames < s.stop:
                advance_random(s.session, seed=i) if synthetic else s.session.add_frames(pixels)
                m = s.session.memory_stats()
                per_clip.setdefault(s.label, []).append([s.session.frames, m["device_kv_bytes"], m["host_kv_bytes"]])
        if frames in checkpoints:
            here = [s for s in active if s.session.frames == frames or s.keep]
            timed = [s for s in here if s.session.memory_stats()["device_kv_bytes"] <= max_ttft_gib * 2**30]
            runs = interleaved_ttft(timed, repeats)
            for s in here:
                points.setdefault(s.label, []).append(point(s.session, frames, runs.get(s.label, [])))
            save()
            tqdm.write(f"{desc} {frames} frames: " + "; ".join(
                f"{s.label} device {points[s.label][-1]['device_kv_bytes'] / 2**20:.1f} MiB, host "
                f"{points[s.label][-1]['host_kv_bytes'] / 2**20:.1f} MiB, TTFT "
                + ("-" if points[s.label][-1]["ttft_s"] is None else f"{1e3 * points[s.label][-1]['ttft_s']:.1f} ms")
                for s in here), file=sys.stderr)
        active = [s for s in active if s.session.frames < s.stop or s.keep]


def ttft_by_frames(run: dict, label: str) -> dict[int, float]:
    return {p["checkpoint"]: p["ttft_s"] for p in run["points"].get(label, []) if p["ttft_s"] is not None}


def summarize(row: dict) -> dict[str, Any]:
    """Frames that fit in LiveVLM's device memory, and the TTFT ratios the issue targets."""
    beside_full, beside_rekv = row["runs"]["with_fullvideo"], row["runs"]["with_rekv"]
    per_clip, c = beside_full["memory_per_clip"], row["model_config"]
    budget = max(device for _, device, _ in per_clip["livevlm"])
    bytes_per_frame = row["frame_tokens"] * c["num_layers"] * 2 * c["num_kv_heads"] * c["head_dim"] * row["kv_itemsize"]
    live_frames = max(f for f, device, _ in per_clip["livevlm"] if device <= budget)
    full_fit = max((f for f, device, _ in per_clip["fullvideo"] if device <= budget), default=0)
    exact_fit = budget // bytes_per_frame
    live, ref = ttft_by_frames(beside_full, "livevlm"), ttft_by_frames(beside_full, REFERENCE)
    full = ttft_by_frames(beside_full, "fullvideo")
    live_r, rekv = ttft_by_frames(beside_rekv, "livevlm"), ttft_by_frames(beside_rekv, "rekv")
    ratio = lambda a, b: a / b if a and b else None
    return {
        "device_budget_bytes": budget,
        "fullvideo_exceeded_budget": any(device > budget for _, device, _ in per_clip["fullvideo"]),
        "fullvideo_frames_fit": full_fit,
        "fullvideo_frames_fit_exact_buffers": exact_fit,
        "livevlm_frames_streamed_within_budget": live_frames,
        "frames_ratio_vs_fullvideo": ratio(live_frames, full_fit),
        "frames_ratio_vs_exact_buffers": ratio(live_frames, exact_fit),
        "livevlm_ttft_1024_over_64": ratio(live.get(1024), ref.get(1024)),
        "livevlm_ttft_longest_over_64": ratio(live.get(max(live)), ref.get(max(live))),
        "fullvideo_over_livevlm_ttft_256": ratio(full.get(256), live.get(256)),
        "rekv_over_livevlm_ttft_256": ratio(rekv.get(256), live_r.get(256)),
    }


def series(row: dict) -> dict[str, list[dict]]:
    """The main curves: LiveVLM and FullVideo side by side, ReKV beside its own LiveVLM."""
    runs = row["runs"]
    return {"livevlm": runs["with_fullvideo"]["points"]["livevlm"],
            "fullvideo": runs["with_fullvideo"]["points"]["fullvideo"],
            REFERENCE: runs["with_fullvideo"]["points"][REFERENCE],
            "livevlm (beside rekv)": runs["with_rekv"]["points"]["livevlm"],
            "rekv": runs["with_rekv"]["points"]["rekv"]}


def markdown_table(rows: list[dict]) -> str:
    """Per configuration and frame count: device (and ReKV host) KV MiB, and TTFT ms of each
    method beside the LiveVLM it was timed with."""
    lines = ["| config | frames | LiveVLM device MiB | FullVideo device MiB | ReKV device / host MiB "
             "| TTFT ms: LiveVLM / FullVideo | LiveVLM / ReKV |", "|---|" + "---:|" * 6]
    for row in rows:
        by = {name: {p["checkpoint"]: p for p in pts} for name, pts in series(row).items()}
        mib = lambda name, f, key: "-" if f not in by[name] else f"{by[name][f][key] / 2**20:.1f}"
        ms = lambda name, f: "-" if by[name].get(f, {}).get("ttft_s") is None else f"{1e3 * by[name][f]['ttft_s']:.0f}"
        for f in sorted(by["livevlm"]):
            lines.append(f"| {row['config']} | {f} | {mib('livevlm', f, 'device_kv_bytes')} "
                         f"| {mib('fullvideo', f, 'device_kv_bytes')} "
                         f"| {mib('rekv', f, 'device_kv_bytes')} / {mib('rekv', f, 'host_kv_bytes')} "
                         f"| {ms('livevlm', f)} / {ms('fullvideo', f)} | {ms('livevlm (beside rekv)', f)} / {ms('rekv', f)} |")
    return "\n".join(lines)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.2 * len(rows)), squeeze=False)
    for (mem_ax, ttft_ax), row in zip(axes, rows):
        for name, pts in series(row).items():
            x = [p["checkpoint"] for p in pts]
            style = dict(marker="o", ls=":" if name in (REFERENCE, "livevlm (beside rekv)") else "-")
            if name not in (REFERENCE, "livevlm (beside rekv)"):
                mem_ax.plot(x, [p["device_kv_bytes"] / 2**20 for p in pts], label=f"{name} device", **style)
            if name == "rekv":
                mem_ax.plot(x, [p["host_kv_bytes"] / 2**20 for p in pts], marker="x", ls="--", label="rekv host")
            ttft_ax.plot(x, [float("nan") if p["ttft_s"] is None else 1e3 * p["ttft_s"] for p in pts], label=name,
                         **style)
        mem_ax.axhline(row["summary"]["device_budget_bytes"] / 2**20, color="gray", lw=0.8, ls=":",
                       label="LiveVLM's device KV (the budget)")
        for ax, title in ((mem_ax, "KV memory (MiB)"), (ttft_ax, "time to first token (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("frames streamed")
            ax.set_title(f"{row['config']} ({row['model']}): {title}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from kvjax import StreamSession
    from kvjax.environment import environment
    from bench.method_speed import save_result

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--frames", type=int, nargs="+", default=FRAMES, help="checkpoints (multiples of 8 frames)")
    p.add_argument("--live-frames", type=int, default=None,
                   help=f"LiveVLM streams on to this many frames (its frames-that-fit count; default {LIVE_FRAMES})")
    p.add_argument("--layers", type=int, default=24, help="0.5b: decoder layers (24 in Qwen2-0.5B)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32", help="0.5b: weights and KV")
    p.add_argument("--max-ttft-kv-gib", type=float, default=4.0,
                   help="no time to first token where the stream's device KV exceeds this (the question "
                        "pass copies the attended KV: FullVideo needs twice its memory)")
    p.add_argument("--repeats", type=int, default=5, help="timed first-token calls per checkpoint and method")
    p.add_argument("--reduced", action="store_true", help=f"a few minutes on a CPU: {REDUCED} (explicit flags win)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/stream-...)")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the JSON's, .png)")
    if p.parse_known_args(argv)[0].reduced:
        p.set_defaults(**REDUCED)
    args = p.parse_args(argv)
    if any(f % CLIP_FRAMES or f < 64 for f in args.frames) or (args.live_frames or 0) % CLIP_FRAMES:
        p.error(f"--frames and --live-frames must be multiples of the {CLIP_FRAMES}-frame clips, from 64")
    env = environment()
    tag = "-reduced" if args.reduced else ""
    output = args.output or REPO / "bench" / "results" / f"stream{tag}-{env['backend']}-{datetime.date.today()}.json"
    png = args.plot or output.with_suffix(".png")
    settings = {"frames": args.frames, "repeats": args.repeats, "max_ttft_kv_gib": args.max_ttft_kv_gib,
                "methods": {n: make_method(n).describe() for n in ("livevlm", "fullvideo", "rekv")},
                "question": QUESTION, "init_prompt": INIT_PROMPT, "reduced": args.reduced,
                "ttft": "StreamSession.first_token: retrieval + question prefill + first token, compile excluded; "
                        "median over repeats, interleaved with the sessions it is compared with"}
    rows: list[dict] = []
    save = lambda: save_result(output, "stream", env, settings, rows)
    top = max(args.frames)
    for config in args.configs:
        synthetic = config == "0.5b"
        model = qwen2_05b_model(args.layers, args.dtype) if synthetic else tiny_model()
        frame_tokens = 196 if synthetic else model.tokens_per_frame
        live_frames = max(args.live_frames or LIVE_FRAMES[config], top)
        row: dict[str, Any] = {
            "config": config, "model": model.name, "model_config": dataclasses.asdict(model.config),
            "frame_tokens": frame_tokens, "kv_itemsize": jnp.dtype(model.params.embed.dtype).itemsize,
            "live_frames": live_frames,
            "frames_input": ("random keys/values and attention scores per clip through the methods' memory update "
                             "(no vision tower, no clip prefill); the timed question pass is the real model's"
                             if synthetic else "random uint8 frames through the vision tower and every layer"),
            "runs": {"with_fullvideo": {}, "with_rekv": {}}, "summary": {},
        }
        rows.append(row)
        session = lambda name: StreamSession(model, make_method(name), init_prompt=INIT_PROMPT,
                                             frame_tokens=frame_tokens)
        # LiveVLM streams on alone after FullVideo's last checkpoint (its memory then freed).
        longer = {f for f in (2 * top, 4 * top, 8 * top) if f < live_frames} | {live_frames}
        run_side_by_side(model, [Stream("livevlm", session("livevlm"), live_frames),
                                 Stream("fullvideo", session("fullvideo"), top),
                                 Stream(REFERENCE, session("livevlm"), 64, keep=True)],
                         set(args.frames) | longer, synthetic, args.repeats, args.max_ttft_kv_gib,
                         row["runs"]["with_fullvideo"], save, f"{config} livevlm+fullvideo")
        run_side_by_side(model, [Stream("livevlm", session("livevlm"), top), Stream("rekv", session("rekv"), top)],
                         set(args.frames), synthetic, args.repeats, args.max_ttft_kv_gib, row["runs"]["with_rekv"],
                         save, f"{config} livevlm+rekv")
        row["summary"] = summarize(row)
        save()
        print(f"{config}: {row['summary']}", file=sys.stderr, flush=True)
    plot(rows, png)
    print(markdown_table(rows))
    print(f"# wrote {output} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
