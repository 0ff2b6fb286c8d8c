"""Streaming QA over text "frames": caption streams with one fact (issue 5's acceptance task).

A stream is a list of caption lines, one text frame each (``Minute 17: a jogger passed the
bridge.``); one line states a fact, a four-digit door code written on a wall, at a chosen
fraction of the stream. The question is asked after the stream, completion-style: the answer
prefix is fed before generation and the answer is correct when it contains the number.

One fact per stream: measured with dense attention on SmolLM2-135M, one fact in a ~4.5k-token
caption stream is answered 3 times out of 3, but with several facts in one stream it answers
the most recent one whatever is asked.
"""

from __future__ import annotations

import dataclasses

import numpy as np

WHO = ("a jogger", "a cyclist", "a delivery van", "two children", "a bus", "an old man with a dog", "a taxi")
WHAT = ("passed the bridge", "stopped at the corner", "crossed the square", "waited by the fountain",
        "turned left at the bakery", "parked near the school")
QUESTION = "What number was written on the wall?"
ANSWER_PREFIX = "The number written on the wall was"


@dataclasses.dataclass(frozen=True)
class CaptionStream:
    lines: list[str]  # one text frame each
    number: int  # the fact's four-digit number
    fact_line: int | None  # index of the line stating it (None: no fact)

    def correct(self, answer: str) -> bool:
        return str(self.number) in answer


def caption_stream(n_lines: int, seed: int, fact_at: float | None = None) -> CaptionStream:
    """`n_lines` caption frames, deterministic in `seed`; with `fact_at` (a fraction in [0, 1])
    the line at `round(fact_at * (n_lines - 1))` states the fact instead."""
    if not isinstance(n_lines, int) or n_lines < 1:
        raise ValueError(f"n_lines must be an integer >= 1, got {n_lines!r}")
    if fact_at is not None and not 0.0 <= fact_at <= 1.0:
        raise ValueError(f"fact_at must be a fraction in [0, 1], got {fact_at!r}")
    rng = np.random.default_rng(seed)
    lines = [f"Minute {i + 1}: {rng.choice(WHO)} {rng.choice(WHAT)}.\n" for i in range(n_lines)]
    number = int(rng.integers(1000, 9999))
    at = None if fact_at is None else round(fact_at * (n_lines - 1))
    if at is not None:
        lines[at] = f"Minute {at + 1}: the door code {number} was written on the wall.\n"
    return CaptionStream(lines, number, at)


def lines_for_tokens(tokenizer, tokens: int, seed: int = 0) -> int:
    """About how many caption lines make `tokens` tokens with `tokenizer` (measured on 64)."""
    sample = caption_stream(64, seed).lines
    per_line = sum(len(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in sample) / len(sample)
    return max(1, round(tokens / per_line))
