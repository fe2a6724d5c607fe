"""Checkpoint to checkpoint, one block at a time: quantizing models larger than memory.

The road for calibration-free quantizers (rounding, log, sign): the model object is never built
with weights; a meta-device skeleton says which tensors the output holds. For each decoder block
in turn the block's routed experts are read from the source's shards one weight at a time and
packed, its planned linears are read and packed, its other tensors are copied, and the block is
written as one shard of the output (:class:`~moeq.io.resumable.ResumableOutput`, so a killed run
resumes with the next block). The tensors outside the blocks (embeddings, final norm, head) form
the last shard. Resident memory stays at one block's non-expert tensors, one expert weight and
one block's packed experts, whatever the model's size.

On-disk expert layouts are handled by the family adapter while reading (transformers 5's fused
``gate_up_proj`` or older per-expert keys such as Mixtral's ``w1/w3/w2``); the output uses the
model's module paths, as :func:`moeq.save` writes them.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..executors import Executor, SerialExecutor
from ..modules.convert import quantize_experts, quantize_linear, validate_plan
from ..plan import BitPlan
from .checkpoint import TOKENIZER_FILES
from .hf import MoeqConfig
from .lazy import LazyModel, open_lazy
from .resumable import ResumableOutput, fingerprint_inputs
from .source import read_config, require_full_precision, source_quantization

__all__ = ["quantize_checkpoint", "block_paths", "rest_tensors", "metadata_writer", "run_unit", "UnitJob", "REST_UNIT"]

REST_UNIT = "rest"  # the unit (and shard) of every tensor outside the decoder blocks


def block_paths(lazy: LazyModel) -> list[str]:
    """Module paths of every block, in the order calibration walks them."""
    paths = []
    for stack in lazy.adapter.layer_stacks(lazy.skeleton):
        blocks = lazy.skeleton.get_submodule(f"{stack.path}.{stack.blocks}")
        paths += [f"{stack.path}.{stack.blocks}.{number}" for number in range(len(blocks))]
    return paths


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": tensor.detach() for name, tensor in module.state_dict().items()}


@torch.no_grad()
def _block_tensors(lazy: LazyModel, plan: BitPlan, path: str) -> dict[str, torch.Tensor]:
    """Every output tensor of the block at ``path``: packed where planned, copied otherwise."""
    scale_dtype = getattr(torch, plan.scale_dtype)
    layers = [layer for layer in lazy.layers if layer.experts_path.startswith(path + ".")]
    linears = {name: spec for name, spec in plan.linears.items() if name.startswith(path + ".")}
    owned = tuple(layer.experts_path + "." for layer in layers) + tuple(name + "." for name in linears)
    tensors = {}
    for name in lazy.skeleton.get_submodule(path).state_dict(keep_vars=True):
        key = f"{path}.{name}"
        if not key.startswith(owned):
            tensors[key] = lazy.read_tensor(key)
    for layer in layers:
        specs = plan.expert_specs(layer.index)
        if specs:
            tensors.update(_prefixed(layer.experts_path, quantize_experts(lazy.adapter, layer, specs, scale_dtype)))
        else:  # experts kept in full precision, in the layout the model defines
            tensors.update({k: v.clone() for k, v in _prefixed(layer.experts_path, lazy.materialize(layer.experts_path)).items()})
            lazy.release(layer.experts_path)
    for name, spec in linears.items():
        tensors.update(_prefixed(name, _quantize_linear_lazily(lazy, name, spec, scale_dtype)))
    return tensors


def _quantize_linear_lazily(lazy: LazyModel, name: str, spec, scale_dtype: torch.dtype):
    linear = lazy.skeleton.get_submodule(name)
    bias = lazy.read_tensor(f"{name}.bias") if linear.bias is not None else None
    return quantize_linear(linear, lazy.read_tensor(f"{name}.weight"), bias, spec, scale_dtype, name=name)


@torch.no_grad()
def rest_tensors(lazy: LazyModel, plan: BitPlan) -> dict[str, torch.Tensor]:
    """Every stored tensor outside the blocks (tied ones once); planned linears there are packed."""
    blocks = tuple(f"{stack.path}.{stack.blocks}." for stack in lazy.adapter.layer_stacks(lazy.skeleton))
    scale_dtype = getattr(torch, plan.scale_dtype)
    linears = {name: spec for name, spec in plan.linears.items() if not name.startswith(blocks)}
    owned = tuple(name + "." for name in linears)
    out, seen = {}, set()
    for name, tensor in list(lazy.skeleton.named_parameters()) + list(lazy.skeleton.named_buffers()):
        if name.startswith(blocks) or name.startswith(owned) or id(tensor) in seen:
            continue
        owner = lazy.skeleton.get_submodule(name.rpartition(".")[0]) if "." in name else lazy.skeleton
        if name.rpartition(".")[2] in owner._non_persistent_buffers_set:
            continue
        seen.add(id(tensor))
        out[name] = lazy.read_tensor(name).contiguous()
    for name, spec in linears.items():
        out.update(_prefixed(name, _quantize_linear_lazily(lazy, name, spec, scale_dtype)))
    return out


def metadata_writer(lazy: LazyModel, plan: BitPlan) -> Callable[[Path], None]:
    """Writes ``config.json`` (with the plan), the generation config and the tokenizer files."""

    stored = source_quantization(read_config(lazy.folder), lazy.folder)
    if stored:  # the saved plan says what the source itself was stored as (the caller's plan is not changed)
        plan = BitPlan.from_json(plan.to_json())
        plan.method["source_quantization"] = stored

    def write(work: Path) -> None:
        config = copy.deepcopy(lazy.config)
        config.architectures = [type(lazy.skeleton).__name__]
        config.quantization_config = MoeqConfig(plan)
        config.save_pretrained(work)
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (lazy.folder / name).is_file():
                shutil.copy2(lazy.folder / name, work / name)

    return write


@dataclass(frozen=True)
class UnitJob:
    """One unit of a rounding run (a decoder block, or :data:`REST_UNIT`) as plain, picklable data:
    the source folder, the unit and the plan. :func:`run_unit` maps it to the unit's tensors."""

    folder: str
    unit: str
    plan: dict[str, Any]  # BitPlan JSON
    nbytes: int = 0  # the unit's weights in the source: the most a worker holds for it, for executors that size tasks


# The lazy view of the folder being quantized, per process: set by quantize_checkpoint for its run
# (and inherited by forked workers); a worker that starts fresh opens its own on its first job.
_OPEN: dict[str, LazyModel] = {}


def _opened(folder: str) -> LazyModel:
    if folder not in _OPEN:
        _OPEN[folder] = open_lazy(folder)
    return _OPEN[folder]


def _unit_bytes(lazy: LazyModel, units: list[str]) -> dict[str, int]:
    """Bytes of each unit's weights, from the skeleton's shapes (the rest unit: everything else)."""
    sizes = dict.fromkeys(units, 0)
    blocks = [unit for unit in units if unit != REST_UNIT]
    for name, tensor in lazy.skeleton.state_dict(keep_vars=True).items():
        owner = next((unit for unit in blocks if name.startswith(unit + ".")), REST_UNIT)
        sizes[owner] += tensor.numel() * tensor.element_size()
    return sizes


def run_unit(job: UnitJob) -> dict[str, torch.Tensor]:
    """The output tensors of one unit: packed where the plan says, copied otherwise. A pure function
    of the job (the source is only read), so any executor can run it and the bytes are the same."""
    lazy = _opened(job.folder)
    plan = BitPlan.from_json(job.plan)
    return rest_tensors(lazy, plan) if job.unit == REST_UNIT else _block_tensors(lazy, plan, job.unit)


def quantize_checkpoint(
    folder: str | Path,
    plan: BitPlan,
    out: str | Path,
    overwrite: bool = False,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
    executor: Executor | None = None,
) -> Path:
    """Quantize the checkpoint at ``folder`` by ``plan`` with rounding, writing ``out`` block by block.

    With ``resume`` a run killed before it finished continues after its last finished block (the
    inputs must be unchanged); ``progress(unit)`` is called as each block is done (or found done).
    ``executor`` (:mod:`moeq.executors`) runs the units' :func:`run_unit` jobs (default: here, one
    after another); results are written in the units' order whatever the executor, so the output's
    bytes do not depend on it.
    """
    require_full_precision(folder)
    lazy = open_lazy(folder)
    validate_plan(lazy.skeleton, plan)
    lazy.check_tensors()
    fingerprint = fingerprint_inputs(folder, kind="rtn", plan=plan.to_json())
    with ResumableOutput(out, fingerprint, overwrite=overwrite, resume=resume, inputs=(folder,)) as output:
        units = [*block_paths(lazy), REST_UNIT]
        key = str(Path(folder).resolve())
        sizes = _unit_bytes(lazy, units)
        todo = [UnitJob(key, unit, plan.to_json(), sizes[unit]) for unit in units if not output.finished(unit)]
        _OPEN[key] = lazy
        try:
            results = iter((executor or SerialExecutor()).map(run_unit, todo))
            for unit in units:
                if not output.finished(unit):
                    output.write(unit, next(results))
                if progress:
                    progress(unit)
        finally:
            _OPEN.pop(key, None)
        return output.complete(metadata_writer(lazy, plan))
