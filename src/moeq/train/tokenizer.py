"""A byte-level BPE tokenizer trained on the corpus's training split (the ``tokenizers`` library)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["train_tokenizer"]


def train_tokenizer(text: str, vocab_size: int, out: Path):
    """Train byte-level BPE on ``text`` and save it (with its HF wrapper files) into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    wrapped.save_pretrained(out)
    return wrapped
