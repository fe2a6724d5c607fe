"""Evaluation text as token ids: a given file or the corpus's test split, tokenized for the model."""

from __future__ import annotations

from pathlib import Path

import torch

from ..train.corpus import DATA_DIR, read_split

__all__ = ["evaluation_tokens"]


def evaluation_tokens(model_folder: str | Path, data: str | Path | None, max_tokens: int) -> torch.Tensor:
    """1-D token ids of ``data`` (default: the shipped test split), at most ``max_tokens``.

    The tokenizer is the model folder's, or the project's own when the folder has none.
    """
    from transformers import AutoTokenizer

    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"evaluation text {data} does not exist")
    text = Path(data).read_text(errors="replace") if data is not None else read_split("test")
    folder = Path(model_folder)
    source = folder if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file() else DATA_DIR / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(source)
    ids = tokenizer(text[: max_tokens * 16], add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError("the evaluation text gives fewer than two tokens")
    return torch.tensor(ids, dtype=torch.long)
