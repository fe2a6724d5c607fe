"""The tokenizer a GGUF file carries, in the form llama.cpp reads it.

llama.cpp knows two tokenizer families here: byte-level BPE (``tokenizer.ggml.model = gpt2``,
merges as in ``tokenizer.json``) whose pre-tokenizer it names by a fixed string (``gpt-2``,
``qwen2``, ...: it holds the splitting regular expressions itself, it does not read them from the
file), and SentencePiece (``llama``: Mixtral's and Llama 2's), whose merges follow the pieces'
scores in ``tokenizer.model``. A tokenizer is recognised by what its ``tokenizer.json`` says (the
pre-tokenizer's own patterns, compared with the ones llama.cpp's names stand for), never by the
model's name; one it cannot name is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .weights import ExportError

__all__ = ["GGUFVocab", "PRE_TOKENIZERS", "read_vocab"]

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# The split patterns of a byte-level BPE tokenizer.json (in order) -> llama.cpp's pre-tokenizer name.
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "qwen2",
    (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "llama-bpe",
    (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",): "qwen35",
    (
        r"\p{N}{1,3}",
        r"[一-龥぀-ゟ゠-ヿ]+",
        r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ): "deepseek-v3",
    (  # o200k (GPT-4o, gpt-oss): cased words with their contractions, digits in threes, "/" kept with line ends
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + r"?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + r"?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ): "gpt-4o",
}


@dataclass
class GGUFVocab:
    """What ``tokenizer.ggml.*`` holds: the model and pre-tokenizer names, one token, type (and for
    SentencePiece, score) per embedding row, and the special tokens (merges for BPE)."""

    model: str
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: Any  # gguf.SpecialVocab

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def read_vocab(folder: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer of the checkpoint ``folder``, padded to ``vocab_size`` embedding rows."""
    path = folder / "tokenizer.json"
    if not path.is_file() and (folder / "tokenizer.model").is_file():
        return _sentencepiece(folder, vocab_size)
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json; GGUF files carry their tokenizer: copy it into the checkpoint")
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece(folder, vocab_size)
    pre = _byte_level_pre(path, data)
    return _byte_level_bpe(folder, data, vocab_size, pre)


def _byte_level_pre(path: Path, data: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json``."""
    model, pre, decoder = data.get("model") or {}, data.get("pre_tokenizer") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise ExportError(
            f"{path}: GGUF export reads byte-level BPE and SentencePiece tokenizers; this one is a {model.get('type')} "
            f"model with a {decoder.get('type')} decoder"
        )
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [step for step in steps if step.get("type") == "Split"]
    last = steps[-1] if steps else {}
    patterns = tuple(_normal((split.get("pattern") or {}).get("Regex", "")) for split in splits)
    if (splits and len(splits) == len(steps) - 1 and last.get("type") == "ByteLevel" and not last.get("use_regex", True)
            and all(split.get("behavior") == "Isolated" and not split.get("invert") for split in splits)):
        for known, name in PRE_TOKENIZERS.items():
            if tuple(map(_normal, known)) == patterns:
                return name
    shown = " then ".join(patterns) if patterns else json.dumps(pre)[:120]
    raise ExportError(
        f"{path}: its pre-tokenizer ({shown[:200]}) is none that llama.cpp names and moeq recognises "
        f"(gpt-2, {', '.join(PRE_TOKENIZERS.values())}); llama.cpp would split text differently, so it is not exported"
    )


def _normal(pattern: str) -> str:
    # tokenizer.json files write line breaks in a class either escaped or as the characters themselves
    return pattern.replace("\r", r"\r").replace("\n", r"\n")


def _byte_level_bpe(folder: Path, data: dict, vocab_size: int, pre: str) -> GGUFVocab:
    import gguf

    vocab = gguf.vocab.BpeVocab(folder)
    added = {t["id"]: bool(t.get("special")) for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for index, (text, _, _) in enumerate(vocab.all_tokens()):
        tokens.append(text.decode("utf-8") if isinstance(text, bytes) else text)
        if index in added:  # as llama.cpp's converter: special added tokens are control, the others user-defined
            types.append(gguf.TokenType.CONTROL if added[index] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    tokens, types, _ = _padded(folder, tokens, types, None, vocab_size)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    # Unsaid, llama.cpp adds a BOS for some pre-tokenizers (llama-bpe); transformers adds none
    # unless tokenizer.json's post-processor or tokenizer_config.json says so (both read above).
    special.add_special_token.setdefault("bos", False)
    return GGUFVocab("gpt2", pre, tokens, types, None, special)


def _sentencepiece(folder: Path, vocab_size: int) -> GGUFVocab:
    import gguf

    if not (folder / "tokenizer.model").is_file():
        raise ExportError(
            f"{folder}: its tokenizer is SentencePiece (byte-fallback BPE), whose merges llama.cpp takes from the piece "
            "scores in tokenizer.model, which the folder lacks: copy it from the source model"
        )
    try:
        vocab = gguf.vocab.SentencePieceVocab(folder)
    except RuntimeError:  # the sentencepiece package is missing
        raise ExportError("reading tokenizer.model needs the sentencepiece package: pip install 'moeq[llamacpp]'") from None
    tokens, types, scores = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(float(score))
        types.append(kind)
    tokens, types, scores = _padded(folder, tokens, types, scores, vocab_size)
    special = gguf.SpecialVocab(folder, n_vocab=vocab_size)
    special.add_special_token.setdefault("bos", True)  # transformers' LlamaTokenizer adds BOS unless told otherwise
    return GGUFVocab("llama", "default", tokens, types, scores, special)


def _padded(folder: Path, tokens: list[str], types: list, scores: list[float] | None, vocab_size: int):
    """Tokens for every embedding row: rows no token names become unused padding, as llama.cpp's converter does."""
    import gguf

    if len(tokens) > vocab_size:
        raise ExportError(f"{folder}'s tokenizer has {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(gguf.TokenType.UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    return tokens, types, scores
