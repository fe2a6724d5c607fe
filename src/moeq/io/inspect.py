"""What a saved moeq checkpoint holds, per MoE layer and expert, read without loading weights.

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

__all__ = ["ExpertReport", "LayerReport", "CheckpointReport", "inspect_checkpoint"]

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

