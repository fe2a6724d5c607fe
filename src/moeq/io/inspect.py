"""What a saved moeq checkpoint holds, per MoE layer and expert, and what moeq finds in a model it
would quantize; both read without loading weights.

Shapes come from the model skeleton built on the meta device (the adapter is the one source of
truth for where experts are); bytes come from the safetensors headers, so they are the true
storage on disk, scales and zero points included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..models import get_adapter
from ..modules.linear import QuantizedLinear
from .checkpoint import moeq_quantization_config, read_plan
from .shards import shard_files, weight_files

__all__ = ["ExpertReport", "LayerReport", "CheckpointReport", "SourceReport", "inspect_checkpoint", "inspect_source"]

_FP16_BYTES = 2


@dataclass
class ExpertReport:
    expert: int
    bits: dict[str, int]  # projection -> bits
    nbytes: int
    fp16_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp16_bytes / self.nbytes


@dataclass
class LayerReport:
    index: int
    path: str
    experts: list[ExpertReport] = field(default_factory=list)


@dataclass
class CheckpointReport:
    model_type: str
    layers: list[LayerReport]
    file_bytes: int
    model_fp16_bytes: int
    avg_expert_bits: float | None
    method: dict

    @property
    def expert_bytes(self) -> int:
        return sum(e.nbytes for layer in self.layers for e in layer.experts)

    @property
    def expert_fp16_bytes(self) -> int:
        return sum(e.fp16_bytes for layer in self.layers for e in layer.experts)


def inspect_checkpoint(path: str | Path) -> CheckpointReport:
    """Per-layer, per-expert bits and bytes of the moeq checkpoint at ``path``."""
    from ..modules.convert import plan_target
    from .source import meta_skeleton

    folder = Path(path)
    moeq_quantization_config(folder)  # a clear error for other folders, before the skeleton is built
    skeleton = meta_skeleton(folder)
    plan = read_plan(folder, plan_target(skeleton))
    sizes = {name: header.nbytes for name, (_, header) in shard_files(folder).items()}
    adapter = get_adapter(skeleton)
    layers = []
    for layer in adapter.moe_layers(skeleton):
        specs = plan.expert_specs(layer.index)
        report = LayerReport(layer.index, layer.path)
        for expert in range(layer.num_experts):
            bits, nbytes, fp16 = {}, 0, 0
            for projection in layer.projections:
                numel = layer.shapes[projection][0] * layer.shapes[projection][1]
                fp16 += numel * _FP16_BYTES
                spec = specs.get((expert, projection))
                bits[projection] = spec.bits if spec else 16
                if spec:
                    prefix = adapter.quantized_path(layer, expert, projection) + "."
                    nbytes += sum(sizes.get(prefix + name, 0) for name in QuantizedLinear.TENSOR_NAMES)
                else:
                    nbytes += numel * _FP16_BYTES
            report.experts.append(ExpertReport(expert, bits, nbytes, fp16))
        layers.append(report)
    fp16_model = sum(p.numel() for p in skeleton.parameters()) * _FP16_BYTES
    return CheckpointReport(
        model_type=plan.model_type,
        layers=layers,
        file_bytes=sum(f.stat().st_size for f in weight_files(folder)),
        model_fp16_bytes=fp16_model,
        avg_expert_bits=plan.budget.get("avg_expert_bits"),
        method=plan.method,
    )



@dataclass
class SourceReport:
    """What moeq finds in a model folder it would quantize: the family, how the weights are stored,
    the MoE layers (experts, projections and shapes, routers), shared experts, dense blocks and the
    other linears by role; read from config.json and the safetensors headers only."""

    model_type: str
    family: str
    stored_as: str
    moe_layers: list[tuple[str, int, dict[str, tuple[int, int]]]]  # path, experts, projection -> (out, in)
    experts_per_token: int | None
    routers: list[tuple[str, tuple[int, ...] | None]]  # None: a router module that is not one matrix
    linears_by_role: dict[str, int]
    shared_experts: list[str]
    dense_blocks: list[str]
    parameters: int
    expert_parameters: int
    checkpoint_bytes: int


def _stored_as(stored: dict | None, dtype: str) -> str:
    if stored is None:
        return dtype
    if stored["quant_method"] == "mxfp4":
        return "MXFP4 (E2M1 codes, an E8M0 scale per 32), dequantized on read"
    block = stored["weight_block_size"]
    return f"FP8 ({stored['fmt']}) with {block[0]}x{block[1]} block scales, dequantized on read"


def inspect_source(path: str | Path) -> SourceReport:
    """Whether moeq can quantize the model folder at ``path`` and what it found there; errors (no
    adapter, not an MoE, missing or mis-shaped tensors, an unreadable format) name the problem."""
    from ..models.base import LinearRole
    from .lazy import open_lazy
    from .source import read_config, source_quantization

    folder = Path(path)
    raw = read_config(folder)
    stored = source_quantization(raw, folder)
    lazy = open_lazy(folder)
    lazy.check_tensors()  # every tensor the config implies, present and of its shape (headers only)
    skeleton, adapter = lazy.skeleton, lazy.adapter
    roles = adapter.linear_roles(skeleton)
    counts: dict[str, int] = {}
    for role in roles.values():
        counts[role] = counts.get(role, 0) + 1
    moe_blocks = {layer.path.rsplit(".", 1)[0] for layer in lazy.layers}
    blocks = [f"{stack.path}.{stack.blocks}.{n}" for stack in adapter.layer_stacks(skeleton)
              for n in range(len(skeleton.get_submodule(f"{stack.path}.{stack.blocks}")))]
    shared = sorted({name.rsplit(".", 1)[0] for name, role in roles.items() if role == LinearRole.SHARED})
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or next(skeleton.parameters()).dtype).removeprefix("torch.")
    expert_parameters = sum(layer.expert_numel * layer.num_experts for layer in lazy.layers)
    top_k = next((getattr(skeleton.config, k) for k in ("num_experts_per_tok", "moe_topk", "top_k") if hasattr(skeleton.config, k)), None)
    return SourceReport(
        model_type=str(raw.get("model_type")), family=adapter.family,
        stored_as=_stored_as(stored, dtype),
        moe_layers=[(layer.path, layer.num_experts, dict(layer.shapes)) for layer in lazy.layers],
        experts_per_token=top_k,
        routers=[(layer.path, None if layer.router_weight is None else tuple(layer.router_weight.shape)) for layer in lazy.layers],
        linears_by_role=counts, shared_experts=shared,
        dense_blocks=[b for b in blocks if b not in moe_blocks and not any(m.startswith(b + ".") for m in moe_blocks)],
        parameters=sum(p.numel() for p in skeleton.parameters()), expert_parameters=expert_parameters,
        checkpoint_bytes=sum(f.stat().st_size for f in weight_files(folder)),
    )
