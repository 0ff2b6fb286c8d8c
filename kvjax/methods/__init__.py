"""KV-cache methods. Each is a frozen dataclass implementing `kvjax.methods.base.Method`."""

from __future__ import annotations

import dataclasses
from typing import Any

from kvjax.methods.base import Method
from kvjax.methods.clusterkv import ClusterKV
from kvjax.methods.freekv import FreeKV
from kvjax.methods.full import Full
from kvjax.methods.quest import Quest
from kvjax.methods.streaming_llm import StreamingLLM

METHODS: dict[str, type[Method]] = {
    "full": Full,
    "streaming_llm": StreamingLLM,
    "quest": Quest,
    "clusterkv": ClusterKV,
    "freekv": FreeKV,
}


def make_method(name: str, **hyperparameters: Any) -> Method:
    """Build a method from its CLI name; `None` values mean "use the default"."""
    key = name.lower().replace("-", "_")
    if key not in METHODS:
        raise ValueError(f"method={name!r} is unknown; expected one of {sorted(METHODS)}")
    cls = METHODS[key]
    fields = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in hyperparameters.items() if v is not None}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"method {key!r} takes {sorted(fields) or 'no hyperparameters'}, not {unknown}")
    return cls(**given)


__all__ = ["METHODS", "ClusterKV", "FreeKV", "Full", "Method", "Quest", "StreamingLLM", "make_method"]
