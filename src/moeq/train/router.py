"""Router-only fine-tune: measure a real router-norm change Λ for a model without an initial checkpoint.

The mixed-precision paper ranks experts by how much their router rows grew during training,
Λ_e = ||r_e(after)|| - ||r_e(before)|| (PAPERS.md §1). A released checkpoint ships only the
"after" routers, so the allocation falls back to a proxy. This module runs a short fine-tune on
calibration text in which every parameter is frozen except the router weights, saves the routers
as they were before it (``initial_router.safetensors``, the same keys and format ``moeq train``
writes and :mod:`moeq.allocate.api` reads) and saves the tuned model next to it, so Λ becomes a
measured change: routers of rarely useful experts move least under the same data.

The output also holds ``router_tune.json`` (source and settings). Two equivalent ways to use it:
``moeq allocate OUT`` (Λ = tuned − before, read from the folder), or ``moeq allocate MODEL
--reference OUT`` (the marker tells allocation that OUT's routers are the "after" of MODEL's).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from ..files import INITIAL_ROUTER_FILE, ROUTER_TUNE_FILE
from ..atomic import atomic_directory
from .lm import CausalLM, FinetuneConfig, load_causal_lm, short_finetune

__all__ = ["RouterTuneConfig", "router_parameters", "tune_routers", "train_router"]


@dataclass
class RouterTuneConfig(FinetuneConfig):
    lr: float = 1e-3


def router_parameters(model: torch.nn.Module, suffix: str = CausalLM.router_suffix) -> dict[str, torch.nn.Parameter]:
    """The router weights of an MoE model, by parameter name: the ``[experts, hidden]`` matrix its
    adapter reads beside each experts module (any family: gpt-oss's ``mlp.router.weight``, HunYuan's
    ``mlp.gate.wg.weight``), or, where the adapter names none, the parameters ending in ``suffix``."""
    from ..models import moe_layers_or_error

    _, layers = moe_layers_or_error(model)
    network = next((layer for layer in layers if layer.router_weight is None), None)
    if network is not None:
        raise ValueError(f"{network.router_path} is a router network, not an [experts, hidden] matrix; the router-only fine-tune "
                         "tunes router matrices, whose row norms allocation reads")
    named = dict(model.named_parameters())
    routers = {f"{layer.path}.{layer.router_name}": named[f"{layer.path}.{layer.router_name}"]
               for layer in layers if layer.router_name and f"{layer.path}.{layer.router_name}" in named}
    if routers:
        return routers
    routers = {name: p for name, p in model.named_parameters() if name.endswith(suffix)}
    if not routers:
        raise ValueError(f"the model has no router weights (no parameter ends with '{suffix}'); is it a Mixtral-family MoE?")
    return routers


def tune_routers(model: transformers.PreTrainedModel, ids: torch.Tensor, config: RouterTuneConfig) -> dict[str, torch.Tensor]:
    """Fine-tune only the routers of ``model`` in place on 1-D token ids; returns the routers before
    the fine-tune (bfloat16, keyed by parameter name)."""
    routers = router_parameters(model)
    initial = {name: p.detach().clone().to(torch.bfloat16).contiguous() for name, p in routers.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in routers.values():
        p.requires_grad_(True)
    short_finetune(model, ids, list(routers.values()), config)
    for p in model.parameters():
        p.requires_grad_(True)
    return initial


def train_router(model_path: Path, out: Path, calib_text: str, config: RouterTuneConfig, overwrite: bool = False) -> Path:
    """Load a model folder, tune its routers on ``calib_text`` and write the tuned model, its
    tokenizer, ``initial_router.safetensors`` (the routers before) and ``router_tune.json`` to ``out``."""
    if not calib_text.strip():
        raise ValueError("the calibration text is empty; pass a text file with --calib")
    model, tokenizer, dtype, ids = load_causal_lm(model_path, calib_text)  # saved back in the dtype it came in
    initial = tune_routers(model, ids, config)
    with atomic_directory(out, overwrite=overwrite, inputs=(model_path,)) as work:
        model.eval().to(dtype).save_pretrained(work)
        tokenizer.save_pretrained(work)
        save_file(initial, work / INITIAL_ROUTER_FILE, metadata={"format": "pt"})
        (work / ROUTER_TUNE_FILE).write_text(json.dumps({"source": str(model_path), "settings": asdict(config)}, indent=1) + "\n")
    return out
