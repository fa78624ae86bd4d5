"""Text inputs for recipe files: a tokenizer folder and sentences, for Hugging Face text models.

A recipe's ``[text]`` table replaces its ``[[inputs]]`` tables::

    [model]
    factory = "transformers:AutoModel.from_pretrained"
    kwargs = { pretrained_model_name_or_path = "models/minilm", local_files_only = true }

    [text]
    tokenizer = "models/minilm"          # a local folder (AutoTokenizer, offline); default: none
    sentences = ["A first sentence.", "Another one."]
    max_length = 128                     # optional: truncate longer sentences

The example inputs are the sentences tokenized together (padded to the longest), as keyword
inputs (``input_ids``, ``attention_mask``, ...); the ``"text"`` calibration source gives them
in batches of ``batch_size`` sentences, all of that same length. Parsing checks the table's keys
and types and that the tokenizer folder exists; nothing is imported until the recipe runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["TextSpec", "parse_text"]

_TEXT_KEYS = ("tokenizer", "sentences", "max_length")


@dataclass(frozen=True)
class TextSpec:
    """A tokenizer folder and the sentences that make the example (and calibration) inputs."""

    tokenizer: str
    sentences: tuple[str, ...]
    max_length: int | None = None

    def encode(self, where: str) -> dict[str, torch.Tensor]:
        """All sentences tokenized together: ``{name: (len(sentences), length)}`` tensors."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ConfigError(f"{where}: [text] needs the transformers package (pip install transformers)") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: text.tokenizer {self.tokenizer!r} is not a tokenizer folder: {exc}") from exc
        truncate = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        encoded = tokenizer(list(self.sentences), padding=True, return_tensors="pt", **truncate)
        return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}

    def batches(self, where: str, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``count`` batches of ``batch_size`` sentences (the last may be shorter)."""
        encoded = self.encode(where)
        n = len(self.sentences)
        return [{k: v[i:i + batch_size] for k, v in encoded.items()} for i in range(0, n, batch_size)][:count]


def parse_text(table: Any, where: str) -> TextSpec:
    """A ``[text]`` table as a :class:`TextSpec`; ConfigError naming the key and the remedy."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [text] must be a table (tokenizer = \"folder\", sentences = [...])")
    unknown = sorted(set(table) - set(_TEXT_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} in [text]; valid keys: {', '.join(_TEXT_KEYS)}")
    tokenizer, sentences = table.get("tokenizer"), table.get("sentences")
    if not isinstance(tokenizer, str) or not Path(tokenizer).is_dir():
        raise ConfigError(f"{where}: text.tokenizer must name an existing local folder holding a tokenizer "
                          f"(tokenizer.json / vocab.txt ...), got {tokenizer!r}")
    if not isinstance(sentences, list) or not sentences or not all(isinstance(s, str) and s for s in sentences):
        raise ConfigError(f"{where}: text.sentences must be a non-empty list of non-empty strings")
    max_length = table.get("max_length")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ConfigError(f"{where}: text.max_length must be a positive integer, got {max_length!r}")
    return TextSpec(tokenizer, tuple(sentences), max_length)
