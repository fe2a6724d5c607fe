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
    own = (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()
    tokenizer = AutoTokenizer.from_pretrained(folder if own else DATA_DIR / "tokenizer")
    ids = tokenizer(text[: max_tokens * 16], add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise ValueError("the evaluation text gives fewer than two tokens")
    vocab = _vocab_size(folder)
    if vocab is not None and max(ids) >= vocab:
        if own:
            raise ValueError(f"the tokenizer in {folder} gives token {max(ids)}, beyond the model's vocabulary of {vocab}; the folder's tokenizer does not belong to its model")
        raise ValueError(
            f"{folder} has no tokenizer, and moeq's own ({len(tokenizer)} tokens) does not fit the model's vocabulary of {vocab}: "
            "copy the model's tokenizer files (tokenizer.json, tokenizer_config.json) into the folder"
        )
    return torch.tensor(ids, dtype=torch.long)


def _vocab_size(folder: Path) -> int | None:
    from ..io.source import read_config

    raw = read_config(folder)
    size = raw.get("vocab_size") or (raw.get("text_config") or {}).get("vocab_size")
    return size if isinstance(size, int) else None
