"""``moeq export --format gguf``: a moeq checkpoint as one GGUF file that llama.cpp runs.

Every routed expert projection of a layer becomes one stacked tensor ``[experts, out, in]``
(``blk.N.ffn_{gate,up,down}_exps``), so all experts of a (layer, projection) must share one GGML
type: the codes and scales moeq stored are copied into that type's blocks (see
:mod:`moeq.quant.ggml`), never quantized again. Everything moeq left in full precision is
written as ``float_type`` (F16 by default). The file is written beside its destination and
renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ..atomic import OutputLock, OutputWriteError, ensure_output_free, write_failure
from ..plan import BitPlan, PlanError, TensorSpec
from ..targets import TARGETS
from ..quant.ggml import EXACT_TYPES, GGML_TYPES, GGMLType, exact_type, float_rows, ggml_blocks
from ..quant.rtn import resolve_group_size
from .gguf_arch import GGUFArchitecture, architecture_for, rope_permute_rows
from .gguf_vocab import GGUFVocab, read_vocab
from .weights import ExportError, named_weights

__all__ = ["ExportError", "GGUFReport", "export_gguf", "check_gguf_plan"]

FLOAT_TYPES = ("F16", "BF16", "F32")


@dataclass
class GGUFReport:
    """What an export wrote: the file, its size, and the type of every tensor."""

    path: Path
    nbytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)
    expert_bits_per_weight: float = 0.0  # file bytes of the routed expert tensors per expert weight
    note: str | None = None  # what llama.cpp computes differently for this model (GGUFArchitecture.caveat)

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.tensor_types.values():
            counts[name] = counts.get(name, 0) + 1
        return counts


def _exact_or_error(spec: TensorSpec, in_features: int, what: str) -> GGMLType:
    group = resolve_group_size(in_features, spec.group_size, spec.scheme)
    kind = exact_type(spec.scheme, spec.bits, group)
    if kind is None:
        exact = ", ".join(f"{s.value} {b}-bit group {g} ({n})" for (s, b, g), n in EXACT_TYPES.items()) + ", q2_k ... q6_k"
        raise ExportError(
            f"{what} is {spec.bits}-bit {spec.scheme.value} with groups of {group}, which no GGUF type holds exactly "
            f"(GGUF holds: {exact}); quantize for GGUF with --target gguf"
        )
    return kind


def check_gguf_plan(plan: BitPlan, shapes: list[dict[str, tuple[int, int]]]) -> dict[tuple[int, str], GGMLType]:
    """The GGML type of every (layer, projection) expert stack the plan quantizes, or one line
    naming the first stack GGUF cannot hold (the gguf target's own rule, :mod:`moeq.targets`).
    ``shapes``: per MoE layer, projection -> (out, in)."""
    try:
        TARGETS["gguf"].check_plan(plan, shapes)
    except PlanError as err:
        raise ExportError(str(err)) from None
    return {(entry.layer, entry.projection): _exact_or_error(entry.spec, shapes[entry.layer][entry.projection][1],
                                                             f"layer {entry.layer} {entry.projection}")
            for entry in plan.experts}


def _permuted(array: np.ndarray, heads: int) -> np.ndarray:
    return array[rope_permute_rows(array.shape[0], heads)]


def export_gguf(
    checkpoint: str | Path, out: str | Path, *, overwrite: bool = False, float_type: str = "F16", model: nn.Module | None = None
) -> GGUFReport:
    """Write the moeq checkpoint folder ``checkpoint`` as the GGUF file ``out``.

    Args:
        checkpoint: a folder written by ``moeq quantize`` (or :func:`moeq.save`).
        out: the GGUF file; refused if it exists unless ``overwrite``, or if it lies in the checkpoint.
        float_type: GGML type of the tensors moeq left in full precision: F16, BF16 or F32.
        model: the checkpoint already loaded with :func:`moeq.load` (else it is loaded here).
    """
    from ..io.checkpoint import load, read_plan
    from ..io.source import meta_skeleton, read_config
    from ..models import moe_layers_or_error
    from ..modules.convert import plan_target

    checkpoint, out = Path(checkpoint), Path(out)
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"--float-type must be one of {', '.join(FLOAT_TYPES)}, got {float_type!r}")
    if out.suffix != ".gguf":
        raise ExportError(f"{out}: a GGUF file's name ends in .gguf")
    ensure_output_free(out, overwrite, inputs=[checkpoint])
    config = read_config(checkpoint)
    plan = read_plan(checkpoint)  # a folder that is not a moeq checkpoint is refused here
    arch = architecture_for(str(config.get("model_type")))
    arch.check_config(config)
    skeleton = meta_skeleton(checkpoint)
    plan.check_fits(plan_target(skeleton))
    expert_types = check_gguf_plan(plan, [layer.shapes for layer in moe_layers_or_error(skeleton)[1]])
    vocab = read_vocab(checkpoint, int(config["vocab_size"]))
    model = model if model is not None else load(checkpoint)
    layers = moe_layers_or_error(model)[1]

    tensors = _tensor_sources(model, arch, config, layers, expert_types, float_type)
    with OutputLock(out):
        partial = out.with_name(f".{out.name}.partial")
        try:
            report = _write(partial, arch, config, vocab, tensors, plan)
            os.replace(partial, out)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise OutputWriteError(write_failure(err)) from err
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    report.path = out
    report.note = arch.caveat(config)
    return report


@dataclass
class _Tensor:
    name: str
    kind: GGMLType
    produce: object  # () -> np.ndarray: the tensor's data (blocks as uint8, or floats)
    shape: tuple[int, ...]  # logical (numpy order)
    expert: bool = False


def _tensor_sources(model, arch: GGUFArchitecture, config, layers, expert_types, float_type) -> list[_Tensor]:
    """Every tensor of the file, in llama.cpp's order, with a function producing its data."""
    from ..modules.linear import QuantizedLinear

    heads = {"q": config["num_attention_heads"], "k": config.get("num_key_value_heads", config["num_attention_heads"])}
    expert_paths = tuple(layer.experts_path + "." for layer in layers)
    tied = bool(config.get("tie_word_embeddings", False))
    out: list[_Tensor] = []
    modules = dict(model.named_modules())
    for name, tensor in named_weights(model, modules):
        if name.startswith(expert_paths):
            continue
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses the embedding when the file has no output tensor
        split = arch.split(name)
        if split is not None:
            if isinstance(tensor, QuantizedLinear):
                raise ExportError(
                    f"{name} is quantized, but llama.cpp's {arch.arch} holds it split and transposed, so its codes cannot be "
                    "copied; leave it in full precision (drop it from the plan's linears, or quantize without --attn-bits)"
                )
            bid = _block_index(name)
            kind = GGML_TYPES[float_type]
            for part, piece in split(tensor, config).items():
                out.append(_Tensor(part.format(bid=bid), kind, lambda t=piece, k=float_type: float_rows(t, k)[1], tuple(piece.shape)))
            continue
        target = arch.gguf_name(name)
        if target is None:
            raise ExportError(f"{name}: the {arch.arch} GGUF layout has no tensor for it; this family's export is incomplete")
        which = arch.permutation(name)
        if isinstance(tensor, QuantizedLinear):
            quantized = tensor.quantized
            kind = _exact_or_error(tensor.spec, tensor.in_features, name)
            def produce(q=quantized, w=which):
                blocks = ggml_blocks(q)[1]
                return _permuted(blocks, heads[w]) if w else blocks
            out.append(_Tensor(target, kind, produce, quantized.shape))
        else:
            if arch.flattened(name):
                tensor = tensor.reshape(-1)
            # llama.cpp keeps 1-D tensors (norms, biases) in F32, as its converter writes them
            kind = GGML_TYPES[float_type if tensor.dim() > 1 else "F32"]
            def produce(t=tensor, w=which, k=kind.name):
                data = float_rows(t, k)[1]
                return _permuted(data, heads[w]) if w else data
            out.append(_Tensor(target, kind, produce, tuple(tensor.shape)))
    for layer in layers:
        experts = modules[layer.experts_path]
        bid = _block_index(layer.path)
        for projection in layer.projections:
            rows, cols = layer.shapes[projection]
            name = f"blk.{bid}.{arch.experts[projection]}.weight"
            kind = expert_types.get((layer.index, projection))
            if kind is None:  # the plan leaves this layer in full precision
                kind = GGML_TYPES[float_type]
                def produce(layer=layer, p=projection, k=float_type):
                    return np.stack([float_rows(layer.expert_weight(e, p), k)[1] for e in range(layer.num_experts)])
            else:
                def produce(m=experts, p=projection, n=layer.num_experts):
                    return np.stack([ggml_blocks(m.expert(e)[p].quantized)[1] for e in range(n)])
            out.append(_Tensor(name, kind, produce, (layer.num_experts, rows, cols), expert=True))
            if layer.expert_bias is not None:  # [experts, out] in F32, beside the stack (gpt-oss)
                def biases(layer=layer, p=projection):
                    return np.stack([float_rows(layer.bias(e, p), "F32")[1] for e in range(layer.num_experts)])
                out.append(_Tensor(name.removesuffix(".weight") + ".bias", GGML_TYPES["F32"], biases, (layer.num_experts, rows)))
    return sorted(out, key=_gguf_order)


def _block_index(path: str) -> int:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    raise ExportError(f"cannot find the block index in {path}")


def _gguf_order(tensor: _Tensor) -> tuple:
    parts = tensor.name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), parts[2])
    return (0 if parts[0] == "token_embd" else 2, 0, tensor.name)


def _write(path: Path, arch: GGUFArchitecture, config: dict, vocab: GGUFVocab, tensors: list[_Tensor], plan: BitPlan) -> GGUFReport:
    import gguf

    writer = gguf.GGUFWriter(path, arch.arch)
    writer.add_name(str(config.get("_name_or_path") or config.get("model_type")))
    for key, value in arch.hparams(config).items():
        if isinstance(value, bool):
            writer.add_bool(f"{arch.arch}.{key}", value)
        elif isinstance(value, str):
            writer.add_string(f"{arch.arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch.arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch.arch}.{key}", int(value))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_file_type(tensors))
    vocab.add_to(writer)
    writer.add_string("moeq.plan.method", json.dumps(plan.method, sort_keys=True, default=str)[:65000])

    types = gguf.GGMLQuantizationType
    for tensor in tensors:
        nbytes = int(np.prod(tensor.shape[:-1])) * tensor.kind.row_bytes(tensor.shape[-1])
        # Any dtype but uint8 makes add_tensor_info take the shape as logical (not bytes) for raw_dtype.
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), nbytes, raw_dtype=types[tensor.kind.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    report = GGUFReport(path=path, nbytes=0)
    expert_bytes = expert_weights = 0
    for tensor in tensors:
        data = np.ascontiguousarray(tensor.produce())
        writer.write_tensor_data(data.view(np.uint8).reshape(-1) if data.dtype != np.uint8 else data.reshape(-1))
        report.tensor_types[tensor.name] = tensor.kind.name
        if tensor.expert:
            expert_bytes += data.nbytes
            expert_weights += int(np.prod(tensor.shape))
    writer.close()
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
    report.nbytes = path.stat().st_size
    report.expert_bits_per_weight = expert_bytes * 8 / expert_weights if expert_weights else 16.0
    return report


def _file_type(tensors: list[_Tensor]) -> int:
    """general.file_type: the type most expert weights are stored in (llama.cpp only displays it)."""
    import gguf

    weights: dict[str, int] = {}
    for tensor in tensors:
        if tensor.expert:
            weights[tensor.kind.name] = weights.get(tensor.kind.name, 0) + int(np.prod(tensor.shape))
    main = max(weights, key=weights.get) if weights else "F16"
    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{main}", gguf.LlamaFileType.MOSTLY_F16))
