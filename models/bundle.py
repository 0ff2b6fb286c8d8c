"""The model bundle returned by `models.load`: static config, parameter pytree, tokenizer."""

from __future__ import annotations

import dataclasses
from typing import Any

from models.config import ModelConfig
from models.params import Params


@dataclasses.dataclass(frozen=True)
class Model:
    config: ModelConfig
    params: Params
    tokenizer: Any  # a `transformers` tokenizer (encode/decode/apply_chat_template)
    name: str = ""

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids from the config, falling back to the tokenizer's."""
        ids = set(self.config.eos_token_ids)
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(int(tok_eos))
        return tuple(sorted(ids))
