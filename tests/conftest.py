"""Shared helpers: tiny models of every family (built from configs, nothing downloaded)."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through Triton's interpreter. It must be on before anything
# imports triton: triton.language decorates its own helpers at import, and transformers imports
# triton early when some optional packages (hqq) are installed.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from moeq.models.tiny import TINY_FAMILIES, tiny_model  # noqa: E402

# Tiny models: one intra-op thread, as the command line picks for them (moeq.threads). Two threads
# gain little here and lose 2-3x when another process holds a core.
torch.set_num_threads(1)


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Logits of a fixed batch of token ids; encoder-decoders get a fixed decoder prefix too."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :6]).logits
        return model(input_ids=ids).logits


@pytest.fixture(params=TINY_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def source_folder(tmp_path: Path, family: str) -> Path:
    """A full-precision tiny checkpoint of ``family`` saved on disk."""
    folder = tmp_path / f"{family}-source"
    tiny_model(family).save_pretrained(folder)
    return folder


SAMPLE_TEXT = (
    "Mixture of experts models route every token to a few experts. "
    "Quantization gives each expert fewer bits; the router decides which experts matter. "
) * 40


def add_tokenizer(folder: Path, vocab_size: int = 256) -> None:
    """Train a tiny byte-level BPE tokenizer on sample text and save it beside a model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([SAMPLE_TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


def one_line_error(result) -> str:
    """The CLI's refusal: exit code 2 and exactly one non-empty line of output, returned."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]
