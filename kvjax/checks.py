"""Argument checks shared by the public entry points; each error names the argument.

`is_integer` is what "an integer" means for sizes and counts (`CacheSpec`, `generate`,
`perplexity`, `StreamSession`, method hyperparameters through `check_count`): Python and
numpy integers, not bools. Methods keep their hyperparameters as plain Python numbers
(`plain_numbers`), so that `Method.describe` writes them to JSON and equal methods hash alike
as jit static arguments.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any


def is_integer(value: Any) -> bool:
    """True for Python and numpy integers; False for bools (an `int` subclass) and the rest."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """Raise unless `value` is an integer >= `minimum`, naming it as `name`."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def plain_numbers(instance: Any) -> None:
    """Replace numpy scalars in a frozen dataclass's fields by Python ints and floats, in place.

    For hyperparameters computed with numpy (`ClusterKV(budget=np.int64(256))`, a budget from
    `np.arange`): as Python numbers they pass the integer checks, serialise to JSON and make
    the method equal to (and hash like) the one written with literals.
    """
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if is_integer(value) and type(value) is not int:
            object.__setattr__(instance, field.name, int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and type(value) is not float:
            object.__setattr__(instance, field.name, float(value))
