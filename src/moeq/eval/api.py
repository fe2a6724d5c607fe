"""``moeq.evaluate``: what quantization did to a model, measured on text.

Protocol (recorded in the report): the evaluation text is tokenized with the model's tokenizer
and cut into windows of ``seq_len`` tokens moved by ``stride``; in each window only the tokens
not already scored by the previous window count (all of them in the first), so with
``stride == seq_len`` the windows are disjoint and every token after the first of its window is
scored once. On those tokens:

- perplexity ``exp(mean NLL)``;
- KL divergence ``KL(P_reference || P_model)`` of the next-token distributions, averaged;
- per MoE layer, routing agreement: the share of tokens whose set of selected experts is the
  same in both models (each fed its own hidden states, so earlier layers' changes count);
- per MoE layer, the load histogram: tokens routed to each expert (the shared collector);
- bytes in memory (the state dict, tied tensors once), plus the copies a backend built for its
  kernels while evaluating (``cpu-int4``, Triton layouts), and on disk (safetensors files, if a folder);
- tokens per second of the forward pass over the evaluation windows.

An encoder-decoder (Switch) is scored on denoising instead: windows are disjoint (``stride ==
seq_len``), each is span-corrupted as in training (:func:`moeq.train.denoise.corrupt`, 15 % of
the tokens in spans of mean length 3, sentinels the last ids of the vocabulary, a fixed seed, so
every model sees the same corruption), the encoder reads the corrupted window and the decoder is
teacher-forced on the target (sentinels, dropped spans, end of sequence); every target token is
scored, so "perplexity" is ``exp`` of the denoising loss, and KL and routing cover the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate.collector import ExpertStatistics
from ..models import moe_layers_or_error
from ..modules.experts import QuantizedExperts

__all__ = ["EvalReport", "evaluate", "windows"]


@dataclass
class EvalReport:
    """The measurements of one model (and, with a reference, its distance to it)."""

    tokens_scored: int
    seq_len: int
    stride: int
    perplexity: float
    kl_to_reference: float | None
    routing_agreement: list[float] | None  # per MoE layer
    expert_load: list[list[int]]  # per MoE layer, tokens per expert
    bytes_in_memory: int
    bytes_on_disk: int | None
    tokens_per_second: float
    reference_perplexity: float | None = None
    kernel_copy_bytes: int = 0  # built by the experts' backend during the evaluation, beside bytes_in_memory
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def windows(ids: torch.Tensor, seq_len: int, stride: int) -> list[tuple[torch.Tensor, int]]:
    """``(window, first scored position)`` pairs covering ``ids`` (1-D) by the protocol above."""
    if stride <= 0 or stride > seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), got {stride}")
    out, scored_until = [], 0
    for start in range(0, max(ids.numel() - 1, 1), stride):
        end = min(start + seq_len, ids.numel())
        if end - start < 2:
            break
        first = max(scored_until - start, 1)
        out.append((ids[start:end], first))
        scored_until = end
        if end == ids.numel():
            break
    return out


def _state_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _routing_recorder(model: nn.Module):
    """Hooks that record each MoE layer's selected experts (as sets, via a sorted index)."""
    adapter, layers = moe_layers_or_error(model)
    records: list[list[torch.Tensor]] = [[] for _ in layers]
    statistics = ExpertStatistics()
    handles = []
    for layer in layers:
        module = model.get_submodule(layer.experts_path)

        def hook(m, args, layer=layer):
            _, index, _ = adapter.routing_of_call(layer, args)
            records[layer.index].append(index.sort(dim=-1).values.cpu())

        handles.append(module.register_forward_pre_hook(hook))
        handles.append(module.register_forward_pre_hook(statistics.hook(adapter, layer)))
    return layers, records, statistics, handles


def _examples(model: nn.Module, chunks: list[tuple[torch.Tensor, int]]) -> tuple[list[tuple[dict, slice]], torch.Tensor]:
    """Each window's model inputs and scored logit positions, and all scored target ids (the protocol above)."""
    if not model.config.is_encoder_decoder:
        examples = [({"input_ids": window[None]}, slice(first - 1, -1)) for window, first in chunks]
        return examples, torch.cat([window[first:] for window, first in chunks])
    from ..train.denoise import corrupt, sentinel_ids

    generator = torch.Generator().manual_seed(0)
    pairs = [corrupt(window, sentinel_ids(model.config.vocab_size), model.config.eos_token_id, generator) for window, _ in chunks]
    return [({"input_ids": i[None], "labels": t[None]}, slice(None)) for i, t in pairs], torch.cat([t for _, t in pairs])


@torch.no_grad()
def _measure(model: nn.Module, examples: list[tuple[dict, slice]]):
    """Scored logits, each MoE layer's routing records, the expert statistics, and seconds."""
    layers, records, statistics, handles = _routing_recorder(model)
    logits, started = [], time.perf_counter()
    try:
        for inputs, scored in examples:
            logits.append(model(**inputs).logits[0, scored].float())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(logits), layers, records, statistics, time.perf_counter() - started


def evaluate(
    model: nn.Module | str | Path,
    token_ids: torch.Tensor,
    reference: nn.Module | str | Path | None = None,
    seq_len: int = 256,
    stride: int | None = None,
    backend: str = "auto",
) -> EvalReport:
    """Evaluate ``model`` (a model or a folder; quantized or not) on ``token_ids`` (1-D); a moeq
    model's experts run on ``backend`` (:data:`moeq.kernels.BACKENDS`)."""
    from ..io.source import load_any
    from ..modules.experts import use_backend

    folder = Path(model) if not isinstance(model, nn.Module) else None
    model = load_any(model, backend) if folder else model.eval()
    if not folder and backend != "auto":
        use_backend(model, backend)
    stride = stride or seq_len
    if model.config.is_encoder_decoder and stride != seq_len:
        raise ValueError(f"an encoder-decoder is evaluated on disjoint windows: drop --stride or set it to --seq-len ({seq_len})")
    chunks = windows(token_ids.reshape(-1), seq_len, stride)
    examples, targets = _examples(model, chunks)
    all_logits, layers, records, statistics, seconds = _measure(model, examples)
    nll = F.cross_entropy(all_logits, targets)
    tokens_forwarded = sum(window.numel() for window, _ in chunks)
    load = [[statistics.counts.get((layer.index, e), 0) for e in range(layer.num_experts)] for layer in layers]
    report = EvalReport(
        tokens_scored=int(targets.numel()), seq_len=seq_len, stride=stride, perplexity=float(nll.exp()),
        kl_to_reference=None, routing_agreement=None, expert_load=load, bytes_in_memory=_state_bytes(model),
        bytes_on_disk=sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder else None,
        tokens_per_second=tokens_forwarded / seconds,
        kernel_copy_bytes=sum(m.kernel_copy_nbytes() for m in model.modules() if isinstance(m, QuantizedExperts)),
    )
    if model.config.is_encoder_decoder:
        report.notes.append("encoder-decoder: scored on span-corruption denoising; perplexity is exp(denoising loss)")
    if reference is not None:
        reference = load_any(reference) if not isinstance(reference, nn.Module) else reference.eval()
        ref_all, _, ref_records, _, _ = _measure(reference, examples)
        ref_log_probs = F.log_softmax(ref_all, dim=-1)
        log_probs = F.log_softmax(all_logits, dim=-1)
        report.kl_to_reference = float((ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).mean())
        report.reference_perplexity = float(F.cross_entropy(ref_all, targets).exp())
        report.routing_agreement = [
            float((torch.cat(mine) == torch.cat(theirs)).all(dim=-1).float().mean())
            for mine, theirs in zip(records, ref_records)
        ]
    return report
