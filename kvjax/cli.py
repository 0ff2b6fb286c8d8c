"""The `kvjax` command line: generate, eval, info, demo, stream, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


class UsageError(Exception):
    """A command-line mistake found after parsing (a missing file, flags that do not go
    together); `main` reports it like argparse does: `kvjax CMD: error: ...`, exit status 2."""


METHOD_HYPERPARAMETERS = {
    # CLI flag -> method field; a method receives only the fields it declares.
    "budget": int,
    "sink": int,
    "page_size": int,
    "dense_layers": int,
    "tokens_per_cluster": int,
    "kmeans_iters": int,
    "window": int,
    "window_clusters": int,
    "selection": str,
    "init": str,
    "kmeans_seed": int,
    "impl": str,
    "recent": int,
    "tau": float,
    "speculative": bool,  # --speculative / --no-speculative
    "offload": bool,  # --offload / --no-offload
}


# What each hyperparameter flag sets; `_flag_help` adds the default of every method taking it.
HYPERPARAMETER_HELP = {
    "budget": "tokens attended per decode step (per query head; FreeKV: per KV head, sink + pages + recent)",
    "sink": "first tokens, always attended",
    "page_size": "tokens per page",
    "dense_layers": "first layers that keep dense attention",
    "tokens_per_cluster": "prompt tokens per K-means cluster",
    "kmeans_iters": "K-means iterations",
    "window": "generated tokens that are clustered together once they fill the window",
    "window_clusters": "clusters per generated window",
    "selection": "query_head (a selection per query head) or kv_head (per KV head: cheaper, less accurate)",
    "init": "K-means initialisation: even or random",
    "kmeans_seed": "seed of init=random",
    "impl": "xla (jnp references) or pallas (kernels)",
    "recent": "most recent tokens, always attended",
    "tau": "mean query cosine over a KV head's group below which it re-selects with the current query",
    "speculative": "select with the previous step's query (corrected per KV head by tau)",
    "offload": "keep the whole KV in host memory and copy in only what a step attends",
    "short_frames": "most recent frames kept uncompressed",
    "clip_frames": "frames encoded together",
    "memory_tokens": "long-term memory tokens per layer (None: {default_memory}, capped to the context)",
    "sink_fraction": "share of the long-term memory kept by score alone, whatever the bucket",
    "retrieve_ratio": "share of long-term pages a question retrieves",
    "retrieve_frames": "frames a question retrieves",
    "vsb_score": "what memory compression ranks tokens by: attention (the spec) or keydiff (for text-like streams)",
}


def _flag_help(name: str, classes: dict[str, type]) -> str:
    """The flag's meaning and the default of each method (`classes`: CLI name -> class) taking it."""
    import dataclasses

    from kvjax.methods.livevlm import DEFAULT_MEMORY

    defaults = [f"{key} {f.default}" for key, cls in classes.items() for f in dataclasses.fields(cls)
                if f.name == name]
    meaning = HYPERPARAMETER_HELP[name].format(default_memory=DEFAULT_MEMORY)
    return f"{meaning}; default: {', '.join(defaults)}"


def _add_method_args(p: argparse.ArgumentParser, multiple: bool = False) -> None:
    from kvjax.methods import METHODS

    if multiple:
        p.add_argument("--methods", nargs="+", default=["full"], choices=sorted(METHODS),
                       help="methods to compare (default: full)")
    else:
        p.add_argument("--method", default="full", choices=sorted(METHODS), help="KV-cache method")
    for name, typ in METHOD_HYPERPARAMETERS.items():
        kind = {"action": argparse.BooleanOptionalAction} if typ is bool else {"type": typ}
        p.add_argument(f"--{name.replace('_', '-')}", **kind, default=None, help=_flag_help(name, METHODS))


def _method_from_args(name: str, args: argparse.Namespace, strict: bool = True):
    """The method `name` with the hyperparameter flags given on the command line.

    With one `--method`, a flag the method does not take is an error; with several
    `--methods`, each method takes the flags it declares.
    """
    import dataclasses

    from kvjax.methods import METHODS, make_method

    fields = {f.name for f in dataclasses.fields(METHODS[name])}
    given = {k: getattr(args, k) for k in METHOD_HYPERPARAMETERS if getattr(args, k) is not None}
    return make_method(name, **(given if strict else {k: v for k, v in given.items() if k in fields}))


def _load_model(args: argparse.Namespace):
    import models

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    return models.load(args.model)


def _mesh_from_args(spec: str | None, batch: int):
    """The device mesh of `--mesh` (None without it) for `batch` prompts, checked before the
    model loads."""
    if spec is None:
        return None
    from kvjax.sharding import check_batch, make_mesh

    try:
        mesh = make_mesh(spec)
        check_batch(mesh, batch)
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None
    return mesh


def cmd_generate(args: argparse.Namespace) -> int:
    from kvjax.generation import chat_prompt, check_generation_args, generate

    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError("give exactly one of --prompt or --prompt-file")
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UsageError(f"--prompt-file: no such file: {path}")
        prompts = [path.read_text(encoding="utf-8")]
    else:
        prompts = args.prompt
    mesh = _mesh_from_args(args.mesh, len(prompts))
    method = _method_from_args(args.method, args)  # bad arguments fail before the model loads
    check_generation_args(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    model = _load_model(args)
    if args.chat:
        prompts = [chat_prompt(model.tokenizer, p) for p in prompts]
    print(f"generating with {method} ...", file=sys.stderr, flush=True)
    out = generate(model, prompts if len(prompts) > 1 else prompts[0], question=args.question, method=method,
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, mesh=mesh)
    s = out.stats
    if args.json:
        print(json.dumps({"text": out.text, "tokens": out.tokens, "stats": s}, default=str))
    else:
        print("\n---\n".join(out.text) if isinstance(out.text, list) else out.text)
        prompt_tokens = sum(s["prompt_tokens"]) if isinstance(s["prompt_tokens"], list) else s["prompt_tokens"]
        print(
            f"[{prompt_tokens} prompt tokens, prefill {s['prefill_s']:.2f}s "
            f"({prompt_tokens / s['prefill_s']:.0f} tok/s); {s['generated_tokens']} new tokens, "
            f"{s['tokens_per_s']:.1f} tok/s; compile {s['compile_s']:.1f}s; "
            f"KV on device {s['device_kv_bytes'] / 2**20:.1f} MiB]",
            file=sys.stderr,
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kvjax.eval import runner
    from kvjax.eval.tasks import ContextTooShortError, default_haystack_path

    methods = [_method_from_args(m, args, strict=len(args.methods) == 1) for m in args.methods]
    model = _load_model(args)
    if args.task == "perplexity":
        text = args.text or default_haystack_path()
        if text is None:
            raise UsageError("give --text FILE (the default novel in ../shared/data is absent)")
        rows = runner.run_perplexity(model, text, args.lengths, methods, score_tokens=args.score_tokens)
    else:
        try:
            rows = runner.run_task(model, args.task, args.lengths, args.depths, range(args.seeds), methods,
                                   haystack=args.haystack, max_new_tokens=args.max_new_tokens)
        except ContextTooShortError as e:
            raise UsageError(f"--lengths: {e}") from None
    print(runner.format_table(runner.summarize(rows)))
    if args.output:
        path = runner.write_results(args.output, rows, task=args.task, model=args.model)
        print(f"wrote {path}", file=sys.stderr)
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (checked before any model loads)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def needle_depth(text: str) -> float:
    """argparse type: a needle depth, a fraction of the context in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def cmd_info(args: argparse.Namespace) -> int:
    import jax

    from kvjax.compilation_cache import default_directory
    from kvjax.environment import environment
    from models.loading import embedded_model_path

    env = environment()
    try:
        env["embedded_model"] = str(embedded_model_path())
    except FileNotFoundError as e:
        env["embedded_model"] = f"not installed ({e})"
    env["device_list"] = [str(d) for d in jax.devices()]
    cache = default_directory()
    env["compilation_cache"] = "off" if cache is None else str(cache)
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        for k, v in env.items():
            print(f"{k:18s} {v}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Long-context generation with the embedded model: a passkey hidden in a long prompt."""
    from kvjax.eval.tasks import ContextTooShortError, make_sample
    from kvjax.generation import generate_many
    from kvjax.methods import ClusterKV, FreeKV, Full, Quest, StreamingLLM

    model = _load_model(args)
    try:
        sample = make_sample("passkey", model.tokenizer, args.tokens, depth=0.4, seed=7)
    except ContextTooShortError as e:
        raise UsageError(f"--tokens: {e}") from None
    if not args.json:
        print(f"prompt: {sample.context_tokens} tokens with a pass key hidden at 40% depth; "
              f"the question is fed token by token after prefill. One dense prefill is shared by "
              f"all methods (prefill times include each method's own indexing).\n")
    # FreeKV keeps the whole KV in host memory (offload) and on the device only what it attends.
    freekv = FreeKV(budget=256, sink=32, recent=64, page_size=16, offload=True)
    methods = (StreamingLLM(budget=256), Quest(budget=256), ClusterKV(budget=256), freekv, Full())
    outputs = generate_many(model, sample.context, methods, question=sample.question, max_new_tokens=8)
    if args.json:
        print(json.dumps({
            "prompt_tokens": sample.context_tokens, "expected": sample.answers[0],
            "methods": [{"method": m.name, "answer": out.text, "correct": sample.answers[0] in out.text,
                         "stats": out.stats} for m, out in zip(methods, outputs)],
        }, default=str))
        return 0
    for method, out in zip(methods, outputs):
        s = out.stats
        host = f" (+ {s['host_kv_bytes'] / 2**20:.1f} MiB in host memory)" if s.get("host_kv_bytes") else ""
        print(f"{method.name:14s} answer: {out.text.strip()!r:20s} "
              f"({'correct' if sample.answers[0] in out.text else 'wrong'}, expected {sample.answers[0]})")
        print(f"{'':14s} prefill {s['prefill_s']:.2f}s ({sample.context_tokens / s['prefill_s']:.0f} tok/s), "
              f"decode {s['decode_ms_per_step']:.1f} ms/token, KV on device "
              f"{s['device_kv_bytes'] / 2**20:.1f} MiB{host}, compile {s['compile_s']:.1f}s\n")
    return 0


# Commands that compile models, sped up by the persistent compilation cache on later runs
# (`kvjax.compilation_cache`). `bench` times compilation itself, so it starts cold.
COMPILING_COMMANDS = ("generate", "eval", "demo", "stream")

STREAM_METHODS = {"livevlm": "LiveVLM", "fullvideo": "FullVideo", "rekv": "ReKV"}
STREAM_HYPERPARAMETERS = {
    # CLI flag -> streaming method field; a flag the chosen method does not declare is an error.
    "short_frames": int,
    "clip_frames": int,
    "memory_tokens": int,
    "sink_fraction": float,
    "page_size": int,
    "retrieve_ratio": float,
    "retrieve_frames": int,
    "vsb_score": str,  # LiveVLM: "attention" (the spec) or "keydiff" (distinct keys; for text-like streams)
}


def _stream_method(args: argparse.Namespace):
    import dataclasses

    import kvjax

    cls = getattr(kvjax, STREAM_METHODS[args.method])
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: getattr(args, k) for k in STREAM_HYPERPARAMETERS if getattr(args, k) is not None}
    unknown = sorted(set(given) - fields)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise UsageError(f"--method {args.method} does not take {flags}")
    return cls(**given)


def _load_vision_model(directory: str):
    from models.vision_bundle import is_llava_onevision, load_vision_model

    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UsageError(f"--model: no such directory: {path}")
    if not is_llava_onevision(path):
        raise UsageError(f"--model: {path} is not a LLaVA-OneVision directory (its config.json must say "
                         "model_type: llava_onevision)")
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    model = load_vision_model(path)
    if model.tokenizer is None:
        raise UsageError(f"--model: {path} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return model


def _print_answer(live, as_json: bool) -> None:
    """One answer: the text, then time to first token and memory (stderr), or one JSON line."""
    s = live.answer.stats
    if as_json:
        print(json.dumps({"question": live.question, "answer": live.answer.text, "tokens": live.answer.tokens,
                          "frames": live.frames, "video_time_s": live.video_time_s, "stats": s}, default=str),
              flush=True)
        return
    when = "" if live.video_time_s is None else f", {live.video_time_s:.1f} s of video"
    print(f"[{live.frames} frames{when}] Q: {live.question}\nA: {live.answer.text}", flush=True)
    print(f"   (time to first token {s['ttft_s'] * 1e3:.0f} ms, answer {s['decode_s']:.2f} s; "
          f"attended {s['attended_memory_tokens']:.0f} of {s['stream_tokens']} stream tokens; KV on device "
          f"{s['device_kv_bytes'] / 2**20:.1f} MiB, on host {s['host_kv_bytes'] / 2**20:.1f} MiB)",
          file=sys.stderr, flush=True)


def cmd_stream(args: argparse.Namespace) -> int:
    """Stream a video into a LLaVA-OneVision `StreamSession`; answer questions with time to
    first token, after the video (`--ask`) or from stdin while it plays (`--interactive`)."""
    from kvjax.generation import check_generation_args
    from kvjax.live import LiveAnswer, play
    from kvjax.stream import StreamSession

    if not Path(args.video).is_file():
        raise UsageError(f"--video: no such file: {args.video}")
    if not args.ask and not args.interactive:
        raise UsageError("give --ask QUESTION (one or more) or --interactive (questions from stdin)")
    method = _stream_method(args)
    check_generation_args(args.max_new_tokens, 0.0, 1.0)  # before the model loads
    session = StreamSession(_load_vision_model(args.model), method)
    ask = dict(max_new_tokens=args.max_new_tokens, answer_prefix=args.answer_prefix)
    video = dict(fps=args.fps, max_frames=args.max_frames)
    if args.interactive:
        print(f"playing {args.video} at {args.speed}x with {method.name}; type questions (end with Ctrl-D)",
              file=sys.stderr, flush=True)
        play(session, args.video, sys.stdin, speed=args.speed, on_answer=lambda a: _print_answer(a, args.json),
             **video, **ask)
        print(f"end of video and questions: {session.frames} frames streamed", file=sys.stderr, flush=True)
        return 0
    print(f"encoding {args.video} with {method.name} ...", file=sys.stderr, flush=True)
    session.add_video(args.video, **video)
    times = session.memory_stats()
    print(f"{session.frames} frames encoded in {times['encode_s']:.1f} s (compile {session.compile_s:.1f} s)",
          file=sys.stderr, flush=True)
    for question in args.ask:
        _print_answer(LiveAnswer(question, session.ask(question, **ask), session.frames, None), args.json)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`kvjax bench all|compare ...`: the benchmark scripts of a source checkout (bench/)."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "bench" / "suite.py").is_file():
        raise FileNotFoundError(f"kvjax bench needs the bench/ folder of a source checkout (looked in {repo})")
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from bench import suite

    return suite.main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    from kvjax.eval.tasks import TASKS

    parser = argparse.ArgumentParser(
        prog="kvjax", description=__doc__,
        epilog="generate, eval, demo and stream keep compiled programs in a persistent cache "
               "(default ~/.cache/kvjax/xla, under $KVJAX_CACHE_DIR): a second run does not compile them again. "
               "KVJAX_COMPILATION_CACHE=DIR moves it, KVJAX_COMPILATION_CACHE=off turns it off.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a (long) prompt")
    g.add_argument("--model", default="smollm2", help="'smollm2', a .gguf file or an HF directory")
    g.add_argument("--prompt", action="append", help="the prompt; repeat it for a batch of prompts")
    g.add_argument("--prompt-file")
    g.add_argument("--question", help="fed token by token after the prompt (evaluation protocol)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--mesh", help="run on a device mesh, e.g. 'data=2,model=2': data splits the batch of prompts, "
                                  "model the heads, MLP and vocabulary; the sizes multiply to the device count")
    _add_method_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="accuracy / perplexity evaluation")
    e.add_argument("task", choices=[*TASKS, "perplexity"])
    e.add_argument("--model", default="smollm2")
    e.add_argument("--lengths", type=positive_int, nargs="+", default=[2048], help="target prompt tokens")
    e.add_argument("--depths", type=needle_depth, nargs="+", default=[0.1, 0.5, 0.9], help="needle depths in [0, 1]")
    e.add_argument("--seeds", type=positive_int, default=1, help="number of seeds (0..N-1)")
    e.add_argument("--haystack", help="text file for niah haystacks (default: repeated noise)")
    e.add_argument("--text", help="perplexity text (default: ../shared/data/pride_and_prejudice.txt)")
    e.add_argument("--score-tokens", type=positive_int, default=64, help="perplexity: positions scored")
    e.add_argument("--max-new-tokens", type=positive_int, default=None)
    e.add_argument("--output", help="write JSON results here")
    _add_method_args(e, multiple=True)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="devices, versions, embedded model location")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("demo", help="long-context generation demo with the embedded model")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--tokens", type=int, default=6000, help="prompt length in tokens")
    d.add_argument("--json", action="store_true", help="print one JSON object (answers and stats per method)")
    d.set_defaults(func=cmd_demo)

    st = sub.add_parser("stream", help="questions about a video streamed into a LLaVA-OneVision model")
    st.add_argument("--video", required=True, help="video file (anything PyAV decodes)")
    st.add_argument("--model", required=True, help="local HF LLaVA-OneVision directory")
    questions = st.add_mutually_exclusive_group()
    questions.add_argument("--ask", action="append", metavar="QUESTION",
                           help="a question asked after the video (repeatable)")
    questions.add_argument("--interactive", action="store_true",
                           help="play the video at its pace and answer questions typed on stdin meanwhile")
    st.add_argument("--method", choices=sorted(STREAM_METHODS), default="livevlm")
    st.add_argument("--fps", type=float, default=0.5, help="frames sampled per second of video")
    st.add_argument("--max-frames", type=int, default=None)
    st.add_argument("--speed", type=float, default=1.0, help="--interactive playback speed (0: no pacing)")
    st.add_argument("--max-new-tokens", type=int, default=32)
    st.add_argument("--answer-prefix", default=None, help="fed after each question, before the answer")
    st.add_argument("--json", action="store_true", help="one JSON object per answer")
    import kvjax

    stream_classes = {key: getattr(kvjax, cls) for key, cls in STREAM_METHODS.items()}
    for name, typ in STREAM_HYPERPARAMETERS.items():
        st.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help=_flag_help(name, stream_classes))
    st.set_defaults(func=cmd_stream)

    b = sub.add_parser("bench", help="speed benchmarks: 'all [--preset P]' or 'compare FILES [--plot PNG]'",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser (bench/suite.py) takes every option, --help too
        args = argparse.Namespace(command="bench", func=cmd_bench, bench_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    if args.command in COMPILING_COMMANDS:
        from kvjax.compilation_cache import enable_compilation_cache

        enable_compilation_cache()
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"kvjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
