"""The second default model: a small Switch Transformer trained on T5-style span corruption.

transformers' ``SwitchTransformersForConditionalGeneration`` (encoder-decoder, every feed-forward
layer a top-1 mixture of 8 experts), trained by :func:`moeq.train.lm.fit` with the objective here:
a window of ``seq_len`` corpus tokens loses ``noise_density`` of them in spans of mean length
``mean_span``; the encoder reads the rest with one sentinel per span, the decoder writes
``sentinel, span, sentinel, span, ..., eos`` (the T5 recipe, spans placed by random segmentation).

Sentinels: the project's BPE tokenizer (4096 ids) is extended, for this model only, by
``NUM_SENTINELS`` tokens ``<extra_id_0>``...; they take the ids after the BPE vocabulary, so the
shipped tokenizer and the Mixtral default keep their ids, and a model's sentinels are always the
last ``NUM_SENTINELS`` ids of its vocabulary (:func:`sentinel_ids`). ``<|endoftext|>`` (id 0) is
end of sequence, padding and decoder start.

Load balancing: transformers computes Switch's router losses only when not every layer is sparse
(and, in the installed release, that path fails), so :meth:`Denoising.loss` adds the balancing
and router z-losses itself from the router logits, with transformers' own loss functions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers.models.switch_transformers import (
    modeling_switch_transformers as switch,
)

from .corpus import DATA_DIR, fetch_corpus
from .lm import TrainConfig

__all__ = [
    "MEAN_SPAN",
    "NOISE_DENSITY",
    "NUM_SENTINELS",
    "DenoiseConfig",
    "Denoising",
    "corrupt",
    "sentinel_ids",
    "switch_model_config",
]

NUM_SENTINELS = 32
NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


@dataclass
class DenoiseConfig(TrainConfig):
    """:class:`TrainConfig` with the Switch default's sizes and the span-corruption settings."""

    out: Path = Path("src/moeq/data/default-switch")
    seq_len: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    eval_every: int = 250
    hidden: int = 256
    intermediate: int = 128  # per expert
    layers: int = 2  # encoder blocks, and as many decoder blocks
    heads: int = 4
    head_dim: int = 32
    top_k: int = 1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    noise_density: float = NOISE_DENSITY
    mean_span: float = MEAN_SPAN


def spans(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, spans) for a window of ``length`` (at least 2) tokens."""
    noise = min(max(1, round(length * noise_density)), length - 1)
    return noise, max(1, min(round(noise / mean_span), noise, length - noise))


def sentinel_ids(vocab_size: int) -> torch.Tensor:
    """The sentinel ids of a model with ``vocab_size`` ids (the last ``NUM_SENTINELS``), ``<extra_id_0>`` first."""
    return torch.arange(vocab_size - NUM_SENTINELS, vocab_size)


def switch_model_config(config: DenoiseConfig) -> transformers.SwitchTransformersConfig:
    return transformers.SwitchTransformersConfig(
        vocab_size=config.vocab_size + NUM_SENTINELS, d_model=config.hidden, d_ff=config.intermediate, d_kv=config.head_dim,
        num_heads=config.heads, num_layers=config.layers, num_decoder_layers=config.layers, num_experts=config.experts,
        encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=config.seq_len, router_jitter_noise=0.0,
        router_aux_loss_coef=config.aux_loss_coef, router_z_loss_coef=config.z_loss_coef, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=0, decoder_start_token_id=0,
    )


def _segment(total: int, parts: int, generator: torch.Generator) -> list[int]:
    """Random lengths of ``parts`` non-empty pieces summing to ``total``."""
    cuts = (torch.randperm(total - 1, generator=generator)[: parts - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def corrupt(tokens: torch.Tensor, sentinels: torch.Tensor, eos: int, generator: torch.Generator,
            noise_density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[torch.Tensor, torch.Tensor]:
    """Span corruption of one window (1-D): ``(encoder input, decoder target)``, both ending in ``eos``.

    Kept and dropped stretches alternate, a kept one first; their lengths depend only on the
    window's length, so windows of one length stack into a batch.
    """
    noise, count = spans(tokens.numel(), noise_density, mean_span)
    if count > sentinels.numel():
        raise ValueError(f"a window of {tokens.numel()} tokens needs {count} sentinels, the model has {sentinels.numel()}; use shorter windows")
    dropped = _segment(noise, count, generator)
    kept = _segment(tokens.numel() - noise, count, generator)
    inputs, targets, position = [], [], 0
    for i, (keep, drop) in enumerate(zip(kept, dropped)):
        inputs += [tokens[position : position + keep], sentinels[i : i + 1]]
        targets += [sentinels[i : i + 1], tokens[position + keep : position + keep + drop]]
        position += keep + drop
    end = torch.tensor([eos])
    return torch.cat([*inputs, end]), torch.cat([*targets, end])


def _corrupted_batch(windows: torch.Tensor, config: DenoiseConfig, vocab_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    pairs = [corrupt(w, sentinel_ids(vocab_size), 0, generator, config.noise_density, config.mean_span) for w in windows]
    return {"input_ids": torch.stack([p[0] for p in pairs]), "labels": torch.stack([p[1] for p in pairs])}


class Denoising:
    """The Switch default's objective for :func:`moeq.train.lm.fit`: span corruption, cross-entropy
    on the decoder's targets plus the router losses."""

    router_suffix = "mlp.router.classifier.weight"

    def model_config(self, config: DenoiseConfig) -> transformers.SwitchTransformersConfig:
        return switch_model_config(config)

    def build(self, model_config: transformers.SwitchTransformersConfig) -> transformers.PreTrainedModel:
        return transformers.SwitchTransformersForConditionalGeneration(model_config)

    def ready(self, model: transformers.PreTrainedModel) -> None:
        """Nothing to set: Switch's experts are one module each."""

    def prepare(self, config: DenoiseConfig) -> tuple[dict[str, str], object]:
        """The corpus, and the shipped tokenizer extended by the sentinels (the shipped one is not changed)."""
        tokenizer = transformers.AutoTokenizer.from_pretrained(DATA_DIR / "tokenizer")
        if len(tokenizer) != config.vocab_size:
            raise ValueError(f"the shipped tokenizer has {len(tokenizer)} ids, the config expects {config.vocab_size}")
        tokenizer.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)]})
        return fetch_corpus(config.cache), tokenizer

    def batch(self, ids: torch.Tensor, config: DenoiseConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
        # Not lm.random_windows: its draw range differs by one, and the shipped model's batches follow this one.
        starts = torch.randint(0, ids.numel() - config.seq_len, (config.batch_size,), generator=generator)
        windows = torch.stack([ids[s : s + config.seq_len] for s in starts.tolist()])
        return _corrupted_batch(windows, config, config.vocab_size + NUM_SENTINELS, generator)

    def eval_batches(self, ids: torch.Tensor, config: DenoiseConfig) -> list[dict[str, torch.Tensor]]:
        windows = ids[: (ids.numel() // config.seq_len) * config.seq_len].view(-1, config.seq_len)[: config.eval_batches * 8]
        generator = torch.Generator().manual_seed(0)  # the same corruption at every evaluation
        return [_corrupted_batch(w, config, config.vocab_size + NUM_SENTINELS, generator) for w in windows.split(8)]

    def loss(self, model: transformers.PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy + router losses, router losses); the cross-entropy alone is ``output.loss``."""
        output = model(**batch, output_router_logits=True)
        logits = [*output.encoder_router_logits, *output.decoder_router_logits]
        aux = sum(switch.load_balancing_loss_func(l.softmax(-1), l.argmax(-1)) for l in logits)
        z = sum(switch.router_z_loss_func(l) for l in logits)
        router = model.config.router_aux_loss_coef * aux + model.config.router_z_loss_coef * z
        return output.loss + router, router
