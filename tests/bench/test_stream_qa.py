"""bench/stream_qa.py and its task (`kvjax.eval.stream_tasks`): the caption streams, the
recent-only baseline's budget, and the committed results against their own answers. The real
runs take an hour on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import stream_qa
from kvjax.eval.stream_tasks import caption_stream, lines_for_tokens
from kvjax.stream import default_templates

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


@pytest.mark.parametrize("fact_at", [0.0, 0.05, 0.5, 1.0])
def test_caption_stream_states_the_fact_once_at_its_fraction(fact_at):
    stream = caption_stream(200, seed=3, fact_at=fact_at)
    stating = [i for i, line in enumerate(stream.lines) if str(stream.number) in line]
    assert stating == [round(fact_at * 199)] == [stream.fact_line]
    assert all(line.startswith(f"Minute {i + 1}: ") and line.endswith(".\n") for i, line in enumerate(stream.lines))
    assert caption_stream(200, seed=3, fact_at=fact_at) == stream
    assert caption_stream(200, seed=4, fact_at=fact_at).lines != stream.lines
    assert stream.correct(f" {stream.number}.") and not stream.correct(f" {stream.number + 1}.")


def test_caption_stream_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fact_at"):
        caption_stream(10, seed=0, fact_at=1.5)
    with pytest.raises(ValueError, match="n_lines"):
        caption_stream(0, seed=0)


def test_lines_for_tokens_reaches_the_length(tiny_lm):
    n = lines_for_tokens(tiny_lm.tokenizer, 3000)
    text = "".join(caption_stream(n, seed=1, fact_at=0.5).lines)
    assert 0.9 * 3000 < len(tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]) < 1.1 * 3000


def test_recent_baseline_keeps_the_newest_lines_within_its_budget(tiny_lm):
    stream = caption_stream(40, seed=2, fact_at=0.95)
    init, template = default_templates(tiny_lm.tokenizer)
    count = lambda text: len(tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    budget = 200
    _, kept = stream_qa.recent_answer(tiny_lm, stream, budget, init, template)
    assert count(init + "".join(stream.lines[-kept:])) <= budget < count(init + "".join(stream.lines[-kept - 1:]))


@pytest.mark.parametrize("path", sorted(RESULTS.glob("stream_qa-*.json")), ids=lambda p: p.name)
def test_committed_results_match_their_answers(path):
    data = json.loads(path.read_text())
    assert data["benchmark"] == "stream_qa" and data["environment"]["backend"]
    for row in data["rows"]:
        for result in row["results"].values():
            assert result["correct"] == (str(row["number"]) in result["answer"])
    assert data["summary"] == stream_qa.summarize(data["rows"])
    assert stream_qa.markdown_table(data["summary"]).count("\n") >= 2


def test_variants_parse_livevlm_fields_and_name_bad_ones():
    overrides = stream_qa.parse_variant("memory_tokens=1536,sink_fraction=1.0")
    assert overrides == {"memory_tokens": 1536, "sink_fraction": 1.0}
    assert stream_qa.variant_label(overrides) == "livevlm[memory_tokens=1536,sink_fraction=1.0]"
    assert stream_qa.variant_label(stream_qa.parse_variant("")) == "livevlm"
    assert stream_qa.parse_variant("vsb_score=keydiff") == {"vsb_score": "keydiff"}
    with pytest.raises(ValueError, match="memory_token"):
        stream_qa.parse_variant("memory_token=1536")
    with pytest.raises(SystemExit):
        stream_qa.main(["--variants", "nonsense"])
