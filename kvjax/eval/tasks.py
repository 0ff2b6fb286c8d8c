"""Offline prompt construction and scoring for the retrieval tasks (spec ALGORITHMS.md §6).

Every task renders a prompt ``context + question`` fitted to a token budget with the model's own
tokenizer: at most ``target_tokens`` and, once the budget is a few hundred tokens, no more than 2 %
below it. ``context`` is prefilled; ``question`` (which ends with the answer lead-in) is then fed
token by token, the Quest/ClusterKV protocol. Everything is deterministic in ``seed``.

Tasks:

* ``passkey``: the Landmark Attention prompt (task line, repeated noise sentences, the pass-key
  line at ``depth``, "What is the pass key? The pass key is").
* ``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``variable_tracking``: RULER-style
  needle-in-a-haystack prompts, reconstructed from RULER's templates.
* ``kv_retrieval``: a JSON object of random UUID pairs (Lost in the Middle / InfiniteBench style).

Haystacks are the noise sentences by default, or a text file (a novel) passed as ``haystack``,
which is cut into words (so the fit is fine-grained) with needles placed at sentence ends, and
cycled when it is shorter than the budget.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import numbers
import os
import random
import re
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from kvjax.checks import is_integer

__all__ = ["TASKS", "Sample", "Tokenizer", "default_data_dir", "default_haystack_path", "make_sample", "score"]

TASKS: tuple[str, ...] = (
    "passkey",
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "variable_tracking",
    "kv_retrieval",
)

DATA_DIR_ENV = "KVJAX_DATA_DIR"
"""Environment variable overriding the directory that holds the haystack novels."""

FILL_FRACTION = 0.98
"""A fitted prompt has at least this fraction of ``target_tokens`` (when the filler allows)."""

NOISE_SENTENCES: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

_PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
_KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below."

# Needle keys are "adjective-noun" pairs, as RULER's word keys.
_ADJECTIVES = (
    "abundant agreeable ancient angry bewildered bitter bold brave breezy bright broad calm careful "
    "charming cheerful chilly clever clumsy colossal crooked curious damp dazzling delightful dizzy "
    "eager elegant enchanting energetic faithful fancy fierce fluffy foolish fragile friendly gentle "
    "giant gifted glamorous gleaming glorious graceful grumpy handsome happy harsh hollow humble "
    "hungry icy jolly juicy kind lazy lively lonely lucky magnificent massive mellow merry mighty "
    "misty modern narrow nervous noisy obedient odd plain polite proud quaint quick quiet rapid rare "
    "restless rough round rustic scary shiny silent silly slender smooth sparkling spicy steep "
    "stormy sturdy swift tender thankful tidy tiny vast wicked witty wooden zealous"
).split()
_NOUNS = (
    "anchor apple arrow badge balloon banana basket beacon bicycle blanket bottle bridge bucket "
    "butterfly cabinet camera candle canyon carpet castle cellar chimney circus cloud compass "
    "cottage crayon crystal curtain desert diamond dragon drum eagle engine feather fiesta forest "
    "fountain garden giraffe glacier guitar hammer harbor helmet island jacket jungle kettle kitten "
    "ladder lantern lemon library lighthouse magnet meadow mirror monkey mountain notebook ocean "
    "orchard paddle palace parrot pebble pencil pepper piano pillow planet pocket puzzle rabbit "
    "rainbow river rocket saddle sailboat scarf shadow shovel spider statue teapot temple thunder "
    "tiger tornado tractor trumpet tunnel umbrella valley violin volcano wagon walrus whistle window "
    "wizard zebra"
).split()

_SENTENCE_END = re.compile(r"""[.!?]["'”’)\]_]*\s*$""")
_NOT_SENTENCE_END = re.compile(r"(?:Mr|Mrs|Messrs|Dr|St|Esq|[A-Z])\.", re.IGNORECASE)


class Tokenizer(Protocol):
    """Any Hugging Face tokenizer (only ``encode(text, add_special_tokens=False)`` is used)."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Sequence[int]: ...


class ContextTooShortError(ValueError):
    """`target_tokens` cannot hold the task's instruction, needle(s) and question."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One evaluation prompt: prefill ``context``, feed ``question``, score the continuation."""

    task: str
    context: str
    """The long prompt body, prefilled."""
    question: str
    """Fed token by token after the context; ends with the answer lead-in."""
    answers: tuple[str, ...]
    """Reference strings; see `score`."""
    depth: float | None
    """Depth in [0, 1] of the (first) needle in the haystack."""
    seed: int
    context_tokens: int
    """``len(tokenizer.encode(context + question, add_special_tokens=False))``."""


def default_data_dir() -> Path:
    """Directory of the haystack novels: ``$KVJAX_DATA_DIR``, else ``<repo>/../shared/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def default_haystack_path() -> Path | None:
    """The default novel haystack (Pride and Prejudice), or None when it is not on this machine."""
    path = default_data_dir() / "pride_and_prejudice.txt"
    return path if path.is_file() else None


def score(sample: Sample, prediction: str) -> float:
    """Score a model continuation against ``sample.answers``.

    ``passkey``: 1.0 when the pass key appears as a whole number, else 0.0. Other tasks: RULER's
    ``string_match_all``, the fraction of references contained in the prediction
    (case-insensitive), so 1.0 or 0.0 for single-answer tasks.
    """
    if sample.task not in TASKS:
        raise ValueError(f"unknown task {sample.task!r}; valid tasks: {', '.join(TASKS)}")
    if sample.task == "passkey":
        pattern = rf"(?<!\d){re.escape(sample.answers[0])}(?!\d)"
        return 1.0 if re.search(pattern, prediction) else 0.0
    text = prediction.lower()
    return sum(answer.lower() in text for answer in sample.answers) / len(sample.answers)


def make_sample(
    task: str,
    tokenizer: Tokenizer,
    target_tokens: int,
    depth: float = 0.5,
    seed: int = 0,
    haystack: str | Path | None = None,
    **task_kwargs: Any,
) -> Sample:
    """Build one prompt of ``task`` whose ``context + question`` fits ``target_tokens``.

    ``depth`` places the (first) needle at that fraction of the haystack, at a unit boundary
    (a noise sentence, a novel's sentence end, a needle line or a JSON pair). ``haystack`` is a text
    file used instead of the noise sentences (not for ``kv_retrieval``). ``task_kwargs``:

    * ``niah_multikey``: ``num_distractors`` (default None: the whole haystack is distractor
      needles with other keys, RULER's niah_multikey_2; with a novel haystack it defaults to 3
      distractors scattered through the text, RULER's niah_multikey_1).
    * ``niah_multivalue``: ``num_values`` (default 4) values for the same key, all to be listed.
    * ``variable_tracking``: ``num_hops`` (default 4) and ``num_chains`` (default 1; extra chains
      are distractors with other values).

    The fitted token count is the larger of ``encode(context + question)`` and
    ``encode(context) + encode(question)``, so the prompt fits whichever way a runner tokenizes it.
    Haystacks of large units (distractor-needle lines, JSON pairs) that land more than 2 % short
    are topped up with noise sentences after the haystack, before the question.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    if not is_integer(target_tokens) or target_tokens < 1:
        raise ValueError(f"target_tokens must be a positive int, got {target_tokens!r}")
    if not isinstance(depth, numbers.Real) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if not is_integer(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    target_tokens, seed = int(target_tokens), int(seed)  # numpy integers too (np.arange seeds)
    builder = _BUILDERS[task]
    allowed = [n for n, p in inspect.signature(builder).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(task_kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for task {task!r}; allowed: {allowed or 'none'}")
    if haystack is not None and task == "kv_retrieval":
        raise ValueError("kv_retrieval takes no haystack file: its haystack is the JSON object itself")

    filler = _noise_haystack() if haystack is None else _novel_haystack(_load_units(Path(haystack).expanduser().resolve()))
    rngs = _Rngs(task, seed)
    layout = builder(rngs, float(depth), filler, haystack is not None, **task_kwargs)
    context, question, joint = _fit(layout, tokenizer, target_tokens, task)
    return Sample(task, context, question, layout.answers, float(depth), seed, joint)


# --------------------------------------------------------------------------------------------
# Haystacks and layouts


class _Stream:
    """Cached prefix of an endless sequence of units, so that n units are a prefix of n + 1."""

    def __init__(self, source: Iterator[str]) -> None:
        self._source = source
        self._items: list[str] = []

    def take(self, n: int) -> list[str]:
        if n > len(self._items):
            self._items.extend(itertools.islice(self._source, n - len(self._items)))
        return self._items[:n]


def _always(_unit: str) -> bool:
    return True


@dataclasses.dataclass
class _Haystack:
    """Filler units, how they and the needles are joined, and where a needle may go."""

    units: _Stream
    unit_sep: str
    needle_sep: str
    after_ok: Callable[[str], bool] = _always
    """Whether a needle may follow this unit."""
    coarse: bool = False
    """Units are too large to hit the 2 % window: top up with noise sentences."""


@dataclasses.dataclass
class _Layout:
    """A task instance before fitting: haystack, needles and the text around them."""

    haystack: _Haystack
    needles: list[tuple[float, str]]
    """(depth, text) pairs; needles with the same slot keep this order."""
    template: Callable[[str], str]
    """Haystack text -> context (before any top-up)."""
    question: str
    answers: tuple[str, ...]


class _Rngs:
    """Independent deterministic streams: ``main`` for the answers, ``haystack`` for distractors."""

    def __init__(self, task: str, seed: int) -> None:
        self.main = random.Random(f"kvjax:{task}:{seed}")
        self.haystack = random.Random(f"kvjax:{task}:{seed}:haystack")


def _noise_haystack() -> _Haystack:
    return _Haystack(_Stream(itertools.cycle(NOISE_SENTENCES)), " ", "\n")


def _novel_haystack(words: tuple[str, ...]) -> _Haystack:
    return _Haystack(_Stream(itertools.cycle(words)), "", " ", after_ok=_ends_sentence)


@functools.lru_cache(maxsize=8)
def _load_units(path: Path) -> tuple[str, ...]:
    """A text file as words, each with its trailing whitespace (so joining restores the text)."""
    if not path.is_file():
        raise FileNotFoundError(f"haystack file not found: {path}")
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n").strip()
    if not text:
        raise ValueError(f"haystack file is empty: {path}")
    return tuple(re.findall(r"\S+\s*", text + "\n\n"))


def _ends_sentence(word: str) -> bool:
    word = word.strip()
    return bool(_SENTENCE_END.search(word)) and not _NOT_SENTENCE_END.fullmatch(word.lstrip("\"'“‘(_["))


def _weave(haystack: _Haystack, n: int, needles: Sequence[tuple[float, str]]) -> str:
    """The first n haystack units with each needle inserted at the boundary nearest its depth."""
    units = haystack.units.take(n)
    slots = sorted((_slot(haystack, units, depth), i) for i, (depth, _) in enumerate(needles))
    parts: list[str] = []
    start = 0
    for k, i in slots:
        parts += [haystack.unit_sep.join(units[start:k]).strip(), needles[i][1]]
        start = k
    parts.append(haystack.unit_sep.join(units[start:]).strip())
    return haystack.needle_sep.join(p for p in parts if p)


def _slot(haystack: _Haystack, units: Sequence[str], depth: float) -> int:
    """Insertion index (needle goes before ``units[k]``) nearest ``depth``, at a boundary."""
    n = len(units)
    want = round(depth * n)
    for offset in range(n + 1):
        for k in (want - offset, want + offset):
            if 0 <= k <= n and (k in (0, n) or haystack.after_ok(units[k - 1])):
                return k
    raise AssertionError("unreachable: k = 0 is always a boundary")


# --------------------------------------------------------------------------------------------
# Fitting


def _fit(layout: _Layout, tokenizer: Tokenizer, target: int, task: str) -> tuple[str, str, int]:
    """Choose the haystack size (and a noise top-up for coarse units) to fill ``target``.

    Returns (context, question, joint token count). The fitted count is the larger of the joint
    and the separate tokenization; the separate one exceeds the joint one only at the fixed
    context/question seam, so the search tokenizes just the joint prompt (once per probe) and adds
    the seam excess measured on the bare prompt; a final exact check steps back if ever needed.
    """
    question = layout.question
    q_tokens = _n_tokens(tokenizer, question)
    noise = _noise_haystack().units

    def render(n: int, m: int) -> str:
        context = layout.template(_weave(layout.haystack, n, layout.needles))
        return context + (" ".join(noise.take(m)) + "\n" if m else "")

    def measure(context: str) -> tuple[int, int]:
        joint = _n_tokens(tokenizer, context + question)
        return max(joint, _n_tokens(tokenizer, context) + q_tokens), joint

    base, base_joint = measure(render(0, 0))
    if base > target:
        raise ContextTooShortError(
            f"target_tokens={target} is too small for task {task!r}: its instruction, needle(s) and "
            f"question alone take {base} tokens; use target_tokens >= {base}"
        )
    seam = base - base_joint

    def cost(n: int, m: int) -> int:
        return _n_tokens(tokenizer, render(n, m) + question) + seam

    n, used = _largest_fitting(lambda k: cost(k, 0), target, base)
    m = 0
    if layout.haystack.coarse and used < FILL_FRACTION * target:
        m, _ = _largest_fitting(lambda k: cost(n, k), target, used)
    while True:
        context = render(n, m)
        fitted, joint = measure(context)
        if fitted <= target:
            return context, question, joint
        n, m = (n, m - 1) if m else (n - 1, 0)


def _largest_fitting(cost: Callable[[int], int], target: int, base: int, first: int = 256) -> tuple[int, int]:
    """Largest n >= 0 with ``cost(n) <= target``, and that cost, given ``cost(0) = base <= target``.

    ``cost`` is nondecreasing and nearly linear in n, so probes are secant steps: extrapolation
    until a failing n brackets the answer, then interpolation inside the bracket. Doubling (before
    the bracket) and bisection (when an interpolation fails to halve it) keep the probes O(log n).
    """
    lo, c_lo = 0, base
    hi, c_hi = -1, 0  # hi < 0: no failing n seen yet
    probe, stride, width = first, 1, 0
    while True:
        c = cost(probe)
        if c <= target:
            lo, c_lo = probe, c
        else:
            hi, c_hi = probe, c
        if hi < 0:
            per_unit = max(c_lo - base, 1) / lo
            probe = lo + max(int((target - c_lo) / per_unit), stride)
            stride *= 2
            continue
        if hi - lo <= 1:
            return lo, c_lo
        if width and 2 * (hi - lo) > width:
            probe = (lo + hi) // 2
        else:
            probe = lo + (target - c_lo) * (hi - lo) // max(c_hi - c_lo, 1)
        width = hi - lo
        probe = min(max(probe, lo + 1), hi - 1)


def _n_tokens(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------------------------
# Tasks


def _passkey(rngs: _Rngs, depth: float, filler: _Haystack, novel: bool) -> _Layout:
    """Landmark Attention's pass-key prompt."""
    key = str(rngs.main.randint(10_000, 99_999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _Layout(
        filler,
        [(depth, needle)],
        lambda hay: f"{_PASSKEY_INTRO}\n{hay}\n",
        "What is the pass key? The pass key is",
        (key,),
    )


def _niah_single(rngs: _Rngs, depth: float, filler: _Haystack, novel: bool) -> _Layout:
    """RULER niah_single: one "special magic number" needle in noise or a novel."""
    key, value = _word_key(rngs.main), _magic_number(rngs.main)
    return _Layout(filler, [(depth, _magic_needle(key, value))], _niah_template, _niah_question(key), (value,))


def _niah_multikey(
    rngs: _Rngs, depth: float, filler: _Haystack, novel: bool, *, num_distractors: int | None = None
) -> _Layout:
    """RULER niah_multikey: the real needle among needles with other keys."""
    key, value = _word_key(rngs.main), _magic_number(rngs.main)
    keys = _other_keys(rngs.haystack, key)
    values = _other_numbers(rngs.haystack, value)
    if num_distractors is None and not novel:
        lines = (_magic_needle(k, v) for k, v in zip(keys, values))
        filler = _Haystack(_Stream(lines), "\n", "\n", coarse=True)
        needles = [(depth, _magic_needle(key, value))]
    else:
        count = 3 if num_distractors is None else _check_count("num_distractors", num_distractors, 0)
        distractors = [(rngs.haystack.random(), _magic_needle(next(keys), next(values))) for _ in range(count)]
        needles = [(depth, _magic_needle(key, value)), *distractors]
    return _Layout(filler, needles, _niah_template, _niah_question(key), (value,))


def _niah_multivalue(
    rngs: _Rngs, depth: float, filler: _Haystack, novel: bool, *, num_values: int = 4
) -> _Layout:
    """RULER niah_multivalue: several values for one key (the first at ``depth``), all to be listed."""
    count = _check_count("num_values", num_values, 1)
    rng = rngs.main
    key = _word_key(rng)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]
    depths = [depth] + [rng.random() for _ in values[1:]]
    question = (
        f"What are all the special magic numbers for {key} mentioned in the provided text? "
        f"The special magic numbers for {key} mentioned in the provided text are"
    )
    needles = [(d, _magic_needle(key, v)) for d, v in zip(depths, values)]
    return _Layout(filler, needles, _niah_template, question, tuple(values))


def _variable_tracking(
    rngs: _Rngs, depth: float, filler: _Haystack, novel: bool, *, num_hops: int = 4, num_chains: int = 1
) -> _Layout:
    """RULER variable_tracking: ``VAR X = v`` then ``num_hops`` copies ``VAR Y = VAR X``.

    The asked chain starts at ``depth`` and its hops follow at random later depths, in order;
    distractor chains (other values) lie anywhere.
    """
    hops = _check_count("num_hops", num_hops, 1)
    chains = _check_count("num_chains", num_chains, 1)
    rng = rngs.main
    names = _variable_names(rng, chains * (hops + 1))
    values = rng.sample(range(10_000, 100_000), chains)
    needles: list[tuple[float, str]] = []
    for c, value in enumerate(values):
        chain = names[c * (hops + 1) : (c + 1) * (hops + 1)]
        start = depth if c == 0 else rng.random()
        depths = [start, *sorted(start + (1.0 - start) * rng.random() for _ in range(hops))]
        statements = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        needles += zip(depths, statements)
    value = values[0]
    question = (
        f"Question: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} "
        f"variables are assigned the value {value}, they are:"
    )
    return _Layout(
        filler, needles, lambda hay: f"{_VT_INTRO}\n\n{hay}\n", question, tuple(names[: hops + 1])
    )


def _kv_retrieval(rngs: _Rngs, depth: float, filler: _Haystack, novel: bool) -> _Layout:
    """Key-value retrieval: find one key's value in a JSON object of random UUID pairs."""
    key, value = _uuid(rngs.main), _uuid(rngs.main)
    pairs = (f'"{_uuid(rngs.haystack)}": "{_uuid(rngs.haystack)}"' for _ in itertools.count())
    return _Layout(
        _Haystack(_Stream(pairs), ",\n ", ",\n ", coarse=True),
        [(depth, f'"{key}": "{value}"')],
        lambda hay: f"{_KV_INTRO}\n\nJSON data:\n{{\n {hay}\n}}\n\n",
        f'Key: "{key}"\nThe value associated with the specified key is:',
        (value,),
    )


_BUILDERS: dict[str, Callable[..., _Layout]] = {
    "passkey": _passkey,
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "variable_tracking": _variable_tracking,
    "kv_retrieval": _kv_retrieval,
}


def _niah_template(hay: str) -> str:
    return f"{_NIAH_INTRO}\n{hay}\n"


def _niah_question(key: str) -> str:
    return (
        f"What is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is"
    )


def _magic_needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _magic_number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _other_keys(rng: random.Random, key: str) -> Iterator[str]:
    """Endless distractor keys other than ``key``, without repeats until the word pairs run out."""
    keys = [k for a in _ADJECTIVES for n in _NOUNS if (k := f"{a}-{n}") != key]
    while True:
        rng.shuffle(keys)
        yield from keys


def _other_numbers(rng: random.Random, value: str) -> Iterator[str]:
    """Endless distractor magic numbers other than ``value``."""
    while True:
        if (candidate := _magic_number(rng)) != value:
            yield candidate


def _variable_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct five-letter upper-case variable names."""
    names: dict[str, None] = {}
    while len(names) < count:
        names["".join(rng.choices(string.ascii_uppercase, k=5))] = None
    return list(names)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
