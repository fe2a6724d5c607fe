"""The tokenizer in a GGUF file: llama.cpp, given text, must split it into the tokens transformers
(or SentencePiece) gives the model. Tiny tokenizers are trained here with each pre-tokenizer's own
patterns; llama.cpp tokenizes the prompts itself and its next-token log-probabilities are compared
with moeq's forward on the reference tokenization."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.export import export_gguf
from moeq.export.gguf_vocab import PRE_TOKENIZERS
from moeq.models import auto_model_class
from moeq.models.tiny import tiny_config
from tests.conftest import one_line_error
from tests.export.test_gguf import _moeq_logprobs, llama_cpp_next_tokens

TEXT = ("Mixture of experts models route every token to a few experts; it's 2026 and 12345 tokens cost $3.50!\n"
        "Quantization gives each expert fewer bits: the router decides which experts matter. 日本語の テキスト, don't you?\n\n  ok") * 3
PROMPTS = ["Mixture of experts don't route 123456 tokens!!", "it's 日本語 text\n\n  with spaces", "The router's 3.14 bits; experts matter?",
           "Quantization gives 2026 experts", "tokens cost $3.50 and\nthe router", "ok  ok   don't"]
VOCAB = 400


def _byte_level_tokenizer(folder: Path, pre: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        patterns = next(k for k, v in PRE_TOKENIZERS.items() if v == pre)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|end|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|end|>").save_pretrained(folder)


def _sentencepiece_tokenizer(folder: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    # Llama 2's and Mixtral's settings: BPE with byte fallback, no normalisation, a dummy prefix
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines() * 20), model_prefix=str(folder / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
    )
    (folder / "tokenizer.vocab").unlink()


def _checkpoint(folder: Path, family: str, add_tokenizer) -> Path:
    config = tiny_config(family)
    config.vocab_size, config.initializer_range = VOCAB, 0.2  # peaked logits: a wrong token would show
    if family == "qwen2_moe":
        config.moe_intermediate_size = config.shared_expert_intermediate_size = 64
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    source = folder / "source"
    model.save_pretrained(source)
    add_tokenizer(source)
    # left in full precision and written as F32: only summation order differs, so what is compared is the tokenization
    moeq.save(moeq.quantize(model, moeq.QuantConfig(bits=16)), folder / "q", source=source)
    return folder / "q"


def _compare(checkpoint: Path, path: Path, reference_ids: list[list[int]]) -> None:
    results = llama_cpp_next_tokens(path, PROMPTS)
    ours = _moeq_logprobs(checkpoint, reference_ids)
    compared = 0
    for i, (ids, (count, top)) in enumerate(zip(reference_ids, results)):
        assert count == len(ids)  # llama.cpp split the text into as many tokens
        if top:
            # F32 weights: summation order and llama.cpp's float16 key/value cache differ (measured
            # worst 0.011); other tokens move these by whole units (3.5 with a stray BOS)
            assert max(abs(ours[i, t].item() - lp) for t, lp in top.items()) <= 0.05
            compared += 1
    assert compared >= 3


@pytest.mark.parametrize("pre", ["gpt-2", *PRE_TOKENIZERS.values()])
def test_llama_cpp_tokenizes_byte_level_bpe_as_transformers_does(pre: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    checkpoint = _checkpoint(tmp_path, "qwen2_moe", lambda source: _byte_level_tokenizer(source, pre))
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    _compare(checkpoint, path, [tokenizer(p)["input_ids"] for p in PROMPTS])


def test_llama_cpp_tokenizes_sentencepiece_as_sentencepiece_does(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    checkpoint = _checkpoint(tmp_path, "mixtral", _sentencepiece_tokenizer)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.scores"].contents()) == VOCAB
    processor = spm.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    _compare(checkpoint, path, [[processor.bos_id(), *processor.encode(p)] for p in PROMPTS])  # BOS, as Llama's tokenizer adds


def _refused(checkpoint: Path, tmp_path: Path, match: str) -> None:
    line = one_line_error(CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(tmp_path / "m.gguf")]))
    assert match in line, line
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_a_pre_tokenizer_llama_cpp_does_not_name_is_refused(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, "qwen2_moe", lambda source: _byte_level_tokenizer(source, "qwen2"))
    data = json.loads((checkpoint / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,2}| ?\p{L}+"
    (checkpoint / "tokenizer.json").write_text(json.dumps(data))
    _refused(checkpoint, tmp_path, r"its pre-tokenizer (\p{N}{1,2}| ?\p{L}+) is none that llama.cpp names and moeq recognises")


def test_sentencepiece_without_its_model_file_and_other_tokenizers_are_refused(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path, "qwen2_moe", lambda source: _byte_level_tokenizer(source, "qwen2"))
    data = json.loads((checkpoint / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (checkpoint / "tokenizer.json").write_text(json.dumps(data))
    _refused(checkpoint, tmp_path, "whose merges llama.cpp takes from the piece scores in tokenizer.model, which the folder lacks")
    data["model"] = {"type": "WordPiece", "vocab": {}}
    (checkpoint / "tokenizer.json").write_text(json.dumps(data))
    _refused(checkpoint, tmp_path, "GGUF export reads byte-level BPE and SentencePiece tokenizers; this one is a WordPiece model")
