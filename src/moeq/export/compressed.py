"""``moeq export --format compressed-tensors``: a moeq checkpoint as the folder vLLM serves.

compressed-tensors' ``pack-quantized`` format (what llm-compressor writes, and what vLLM's MoE
layers and transformers read) stores each quantized linear ``[out, in]`` as ``weight_packed``
(int32 words of codes, dense and low bits first, along the input), ``weight_scale`` (one per
row and group), ``weight_zero_point`` (asymmetric schemes: int32 words along the output) and
``weight_shape``; codes and zero points are held as signed values offset by ``2^(b-1)``, so
``w = (q - z) s`` there is moeq's ``(c - z) s`` with ``q = c - 2^(b-1)``. moeq's codes, scales
and zero points are copied, never quantized again; the packing and the config are the
compressed-tensors library's own (``pack_to_int32``, ``QuantizationConfig``).

Routed experts are written one linear per expert under the names the family's checkpoints use
(Mixtral ``block_sparse_moe.experts.E.w1/w2/w3``; Qwen2/3-MoE, OLMoE, DeepSeek-V3
``mlp.experts.E.{gate,up,down}_proj``; other families by the per-expert names transformers'
conversion mapping merges), which both vLLM's and transformers' loaders map onto their fused
expert tensors. vLLM holds one scheme per MoE layer (it reads expert 0's for the
fused layer) and runs W4A16 (sym, or asym with zero points) and W8A16 sym, which is what the
``vllm`` target plans (:mod:`moeq.targets`); the export refuses anything else before it writes.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_directory, ensure_output_free
from ..plan import BitPlan, TensorSpec
from ..quant.schemes import Scheme
from ..quant.tensor import QuantizedTensor
from ..targets import TARGETS
from .weights import ExportError, named_weights

__all__ = ["CompressedReport", "FAMILIES", "export_compressed"]

# Families whose per-expert checkpoint names vLLM's and transformers' loaders both map (checked by
# reading vLLM's model files); others are written when transformers' conversion mapping names
# their experts per expert, as their published checkpoints do.
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
EXPERT_PROJECTIONS = "(w1|w2|w3|gate_proj|up_proj|down_proj)"  # both spellings: older vLLM looks up gate_proj for all


@dataclass
class CompressedReport:
    """What an export wrote: the folder, its weight bytes, the config groups (name -> what they
    hold) and, when transformers 5.23 cannot read it the way vLLM does, why."""

    path: Path
    nbytes: int = 0
    groups: dict[str, str] = field(default_factory=dict)
    expert_bits_per_weight: float = 0.0  # file bytes of the routed experts per expert weight
    transformers_note: str | None = None


def _scheme_key(spec: TensorSpec) -> tuple[int, bool, int | None]:
    return spec.bits, spec.scheme is Scheme.SYM, spec.group_size


def _args(key: tuple[int, bool, int | None]):
    from compressed_tensors.quantization import QuantizationArgs

    bits, symmetric, group = key
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, group_size=group,
                            strategy="group" if group else "channel", dynamic=False)


def _label(key: tuple[int, bool, int | None]) -> str:
    bits, symmetric, group = key
    return f"W{bits}A16 {'sym' if symmetric else 'asym'} " + (f"g{group}" if group else "channel")


def _check_linear(name: str, spec: TensorSpec, in_features: int, out_features: int) -> None:
    kind = TARGETS["vllm"].type_of(spec, in_features)
    if kind is None:
        raise ExportError(f"{name} is {spec.bits}-bit {spec.scheme.value}" + (f" group {spec.group_size}" if spec.group_size else "")
                          + ", which vLLM's kernels do not run (W4A16 sym/asym, W8A16 sym; groups 32, 64, 128 or per "
                          "channel); quantize with --target vllm, or leave it in full precision")
    if spec.scheme is Scheme.ASYM and out_features % (32 // spec.bits):
        raise ExportError(f"{name} has {out_features} rows; zero points pack {32 // spec.bits} rows to a word, "
                          "so an asymmetric scheme needs a multiple of that: use --scheme sym")


def check_compressed_plan(plan: BitPlan, shapes: list[dict[str, tuple[int, int]]], linear_shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse, in one line, a plan vLLM cannot run: a MoE layer whose experts or projections differ
    in scheme, or a scheme its kernels do not take. ``shapes``: per MoE layer, projection -> (out, in);
    ``linear_shapes``: the planned linears' (out, in)."""
    TARGETS["vllm"].check_plan(plan, shapes)  # every expert's type, one scheme per layer
    stacks = {(entry.layer, entry.projection): entry.spec for entry in plan.experts}
    for (layer, projection), spec in stacks.items():  # zero points' packing rule, per expert tensor shape
        out_features, in_features = shapes[layer][projection]
        _check_linear(f"layer {layer} {projection}", spec, in_features, out_features)
    for name, spec in plan.linears.items():
        out_features, in_features = linear_shapes[name]
        _check_linear(name, spec, in_features, out_features)


def _packed(quantized: QuantizedTensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's compressed-tensors tensors from moeq's codes, scales and zero points."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, (rows, cols) = quantized.bits, quantized.shape
    offset = 1 << (bits - 1)
    codes = quantized.unpacked_codes().reshape(rows, cols).to(torch.int16) - offset
    tensors = {
        "weight_packed": pack_to_int32(codes.to(torch.int8), bits),
        "weight_scale": quantized.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if quantized.zeros is not None:
        zeros = quantized.zeros.to(torch.int16) - offset
        tensors["weight_zero_point"] = pack_to_int32(zeros.to(torch.int8), bits, packed_dim=0)
    return tensors


def _disk_name(adapter, name: str) -> str:
    for memory, disk in adapter.disk_renames:
        name = name.replace(memory, disk)
    return name


def export_compressed(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, model: nn.Module | None = None) -> CompressedReport:
    """Write the moeq checkpoint folder ``checkpoint`` as the compressed-tensors folder ``out``.

    Args:
        checkpoint: a folder written by ``moeq quantize`` (or :func:`moeq.save`).
        out: the output folder; refused if it exists unless ``overwrite``, or if it overlaps the checkpoint.
        model: the checkpoint already loaded with :func:`moeq.load` (else it is loaded here).
    """
    try:
        from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    except ImportError:
        raise ExportError("--format compressed-tensors needs the compressed-tensors library: pip install 'moeq[vllm]'") from None
    from ..io.checkpoint import TOKENIZER_FILES, load, read_plan
    from ..io.source import meta_skeleton, read_config
    from ..models import moe_layers_or_error
    from ..modules.convert import plan_target

    checkpoint, out = Path(checkpoint), Path(out)
    config = read_config(checkpoint)
    plan = read_plan(checkpoint)  # a folder that is not a moeq checkpoint is refused here
    model_type = str(config.get("model_type"))
    skeleton = meta_skeleton(checkpoint)
    plan.check_fits(plan_target(skeleton))
    adapter, meta_layers = moe_layers_or_error(skeleton)
    if config.get("is_encoder_decoder"):
        raise ExportError(f"{checkpoint} is {model_type}, an encoder-decoder; vLLM's compressed-tensors MoE layers serve "
                          "decoder-only models")
    names = getattr(adapter, "disk_projection_names", {})
    if model_type not in FAMILIES and not all(names.get(p) for p in meta_layers[0].projections):
        raise ExportError(f"{checkpoint} is {model_type}, whose checkpoints do not name one linear per expert (vLLM's "
                          f"compressed-tensors MoE loader reads experts.E.<projection>); the export writes "
                          f"{', '.join(FAMILIES)} and the families transformers maps from per-expert names")
    linear_shapes = {name: tuple(skeleton.get_submodule(name).weight.shape) for name in plan.linears}
    check_compressed_plan(plan, [layer.shapes for layer in meta_layers], linear_shapes)
    ensure_output_free(out, overwrite, inputs=[checkpoint])
    model = model if model is not None else load(checkpoint)
    layers = moe_layers_or_error(model)[1]
    model_dtype = next(model.parameters()).dtype
    stored = getattr(torch, plan.scale_dtype)
    # Scales as the plan stored them; widened to a float32 model's dtype (exact), so readers that
    # dequantize in the scale's dtype give moeq's weights.
    scale_dtype = torch.float32 if model_dtype == torch.float32 else stored

    tensors, targets, report = _tensors(model, adapter, layers, plan, scale_dtype, config)
    groups, labels = {}, {}
    for number, (key, names) in enumerate(sorted(targets.items(), key=lambda item: item[0][:2] + (item[0][2] or 0,))):
        name = f"group_{number}"
        groups[name] = QuantizationScheme(targets=names, weights=_args(key), format="pack-quantized")
        labels[name] = _label(key)
    modules = dict(model.named_modules())
    gates = [f"{layer.path}.{name}" for layer in layers for name in ("gate", "shared_expert_gate") if f"{layer.path}.{name}" in modules]
    ignore = ["lm_head", *(_disk_name(adapter, path) for path in gates)]  # routers and shared-expert gates stay as they are
    quantization = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed", ignore=ignore)
    saved = {key: value for key, value in config.items() if key != "quantization_config"}
    saved["quantization_config"] = quantization.model_dump(mode="json")
    report.groups = labels
    report.transformers_note = _transformers_note(plan, layers)

    from safetensors.torch import save_file

    with atomic_directory(out, overwrite, inputs=[checkpoint]) as work:
        save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        (work / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        for name in (*TOKENIZER_FILES, "generation_config.json"):  # what a moeq checkpoint carries beside its weights
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, work / name)
    report.path = out
    report.nbytes = (out / "model.safetensors").stat().st_size
    return report


def _tensors(model, adapter, layers, plan: BitPlan, scale_dtype: torch.dtype, config: dict):
    """Every tensor of the folder (by its on-disk name), the config groups' targets per scheme, and
    the report's expert bytes."""
    from ..modules.linear import QuantizedLinear

    modules = dict(model.named_modules())
    expert_paths = tuple(layer.experts_path + "." for layer in layers)
    tied = bool(config.get("tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[tuple, list[str]] = {}
    for name, tensor in named_weights(model, modules):
        if name.startswith(expert_paths) or (tied and name == "lm_head.weight"):
            continue
        disk = _disk_name(adapter, name)
        if isinstance(tensor, QuantizedLinear):
            prefix = disk[: -len(".weight")]
            for suffix, value in _packed(tensor.quantized, scale_dtype).items():
                tensors[f"{prefix}.{suffix}"] = value
            if tensor.bias is not None:
                tensors[f"{prefix}.bias"] = tensor.bias.detach().contiguous()
            targets.setdefault(_scheme_key(tensor.spec), []).append(prefix)
        else:
            tensors[disk] = tensor.detach().contiguous()
    expert_bytes = expert_weights = 0
    by_scheme: dict[tuple, list[str]] = {}
    for layer in layers:
        experts = modules[layer.experts_path]
        specs = plan.expert_specs(layer.index)
        base = _disk_name(adapter, layer.experts_path)
        for expert in range(layer.num_experts):
            for projection in layer.projections:
                prefix = f"{base}.{expert}.{adapter.disk_projection_names.get(projection, projection)}"
                rows, cols = layer.shapes[projection]
                expert_weights += rows * cols
                if (expert, projection) not in specs:  # this layer's experts stay in full precision
                    tensors[f"{prefix}.weight"] = layer.expert_weight(expert, projection).detach().contiguous()
                    expert_bytes += tensors[f"{prefix}.weight"].nbytes
                    continue
                packed = _packed(experts.expert(expert)[projection].quantized, scale_dtype)
                tensors.update({f"{prefix}.{suffix}": value for suffix, value in packed.items()})
                expert_bytes += sum(value.nbytes for value in packed.values())
        if specs:
            key = _scheme_key(next(iter(specs.values())))
            by_scheme.setdefault(key, []).append(base)
    for key, bases in by_scheme.items():
        alternatives = "|".join(re.escape(base) for base in bases)
        targets.setdefault(key, []).insert(0, f"re:.*({alternatives})\\.\\d+\\.{EXPERT_PROJECTIONS}$")
    report = CompressedReport(Path(), expert_bits_per_weight=expert_bytes * 8 / expert_weights if expert_weights else 16.0)
    return tensors, targets, report


def _transformers_note(plan: BitPlan, layers) -> str | None:
    """Why transformers 5.23 would not read the folder as vLLM does (``None``: it does). Measured:
    its expert loader applies the first experts group's scheme to every MoE layer, passes no zero
    points, and needs every layer's experts quantized."""
    keys = {_scheme_key(spec) for layer in layers for spec in plan.expert_specs(layer.index).values()}
    if any(not plan.expert_specs(layer.index) for layer in layers):
        return "some MoE layers keep full-precision experts, which transformers 5.23's compressed-tensors loader refuses"
    if len(keys) > 1:
        return ("its MoE layers use different schemes; transformers 5.23's compressed-tensors loader applies the first one to "
                "every layer and loads wrong weights without an error (vLLM reads each layer's own)")
    if any(not symmetric for _, symmetric, _ in keys):
        return "its experts are asymmetric; transformers 5.23's compressed-tensors loader does not pass zero points to experts"
    if any(spec.scheme is Scheme.ASYM for spec in plan.linears.values()):
        return ("its asymmetric dense linears load in transformers 5.23 only with "
                "quantization_config=CompressedTensorsConfig(dequantize=True)")
    return None
