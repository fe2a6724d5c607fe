"""Reading a checkpoint lazily: one tensor (or one expert's slice of a fused tensor) at a time.

``open_lazy(folder)`` builds the model's skeleton on the meta device (no weights), asks the
adapter for its MoE layers, and rebinds each layer's ``expert_weight`` to read from the
safetensors shards on demand through memory maps. Routers are read eagerly (they are tiny).
The reader counts the bytes it returns, so a caller can say how much of the checkpoint a
computation needed. Files are memory-mapped only for the duration of one read, so the process's
resident memory stays at the size of the tensors it holds, not of the pages it has read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..models import MoEAdapter, MoELayer, moe_layers_or_error
from ..models.base import DerivedTensor, TensorSource
from .checkpoint import CheckpointError
from ..files import INITIAL_ROUTER_FILE
from .shards import shard_files
from .source import meta_skeleton, read_config, source_quantization

__all__ = ["LazyCheckpoint", "LazyModel", "open_lazy"]


class LazyCheckpoint:
    """Tensors of a safetensors checkpoint folder (single file or sharded), read on demand.

    Every read is checked first against the shard's header: the tensor must exist and, when the
    caller says what shape the model expects, have it, so a mis-shaped or oversized tensor is
    refused before its bytes are read. Sources stored quantized come back as floats: block-scaled
    FP8 weights (``fp8_block``) and, with ``mxfp4``, a tensor the model calls ``X`` stored as MXFP4
    ``X_blocks`` / ``X_scales`` (gpt-oss), read in the layout transformers gives the model's
    parameter (``[..., in, out]``), one expert at a time when the read is of one expert.
    """

    def __init__(self, folder: str | Path, fp8_block: tuple[int, int] | None = None, mxfp4: bool = False) -> None:
        self.folder = Path(folder)
        self.bytes_read = 0
        self.fp8_block = fp8_block  # a block-scaled FP8 source's weight_block_size: its weights are dequantized on read
        self.mxfp4 = mxfp4
        # Only the model's weights: a folder may also hold other safetensors files (such as the
        # initial routers a trained checkpoint ships for the router-norm change).
        self._tensors = shard_files(self.folder, exclude=(INITIAL_ROUTER_FILE,))
        self._loaded: dict[str, str | DerivedTensor] = {}
        self._built: tuple[str | None, torch.Tensor | None] = (None, None)

    def keys(self) -> list[str]:
        """The names of the checkpoint's tensors, as stored."""
        return list(self._tensors)

    def use_loaded_names(self, names: dict[str, str | DerivedTensor]) -> None:
        """Also answer to the names the model loads tensors as (an adapter's :meth:`loaded_names`)."""
        self._loaded = {name: disk for name, disk in names.items() if name not in self._tensors}

    def __contains__(self, key: str) -> bool:
        return key in self._tensors or self._is_mxfp4(key) or key in self._loaded

    def _stored(self, source: TensorSource) -> TensorSource:
        """``source`` under its name on disk, where the model loads it renamed."""
        disk = self._loaded.get(source.key)
        return dataclasses.replace(source, key=disk) if isinstance(disk, str) else source

    def _is_mxfp4(self, key: str) -> bool:
        return self.mxfp4 and key not in self._tensors and f"{key}_blocks" in self._tensors

    def _mxfp4_shape(self, key: str) -> tuple[int, ...]:
        """The float shape of MXFP4 ``key`` (``[..., G * 32, rows]``), its blocks and scales checked from their headers."""
        file, blocks = self._tensors[f"{key}_blocks"]
        scales = self._tensors.get(f"{key}_scales")
        if scales is None:
            raise CheckpointError(f"tensor {key}_blocks in {file.name} has no {key}_scales beside it; an MXFP4 weight needs both: "
                                  "restore the checkpoint's missing tensor")
        shape, scale_shape = tuple(blocks.shape), tuple(scales[1].shape)
        if blocks.dtype != "U8" or scales[1].dtype != "U8" or len(shape) < 3 or shape[-1] != 16 or scale_shape != shape[:-1]:
            raise CheckpointError(
                f"tensor {key}_blocks in {file.name} is {blocks.dtype} {list(shape)} with scales {scales[1].dtype} {list(scale_shape)}; "
                "MXFP4 stores uint8 blocks [..., rows, G, 16] (two E2M1 codes a byte) and uint8 scales [..., rows, G]: the checkpoint is malformed"
            )
        return (*shape[:-3], shape[-2] * 32, shape[-3])

    def shape_of(self, source: TensorSource) -> tuple[int, ...]:
        """The shape ``read(source)`` returns, from the header alone."""
        source = self._stored(source)
        derived = self._loaded.get(source.key)
        if isinstance(derived, DerivedTensor):
            parts = [torch.empty(self._tensors[key][1].shape, device="meta") for key in derived.sources]
            file, stored = self._tensors[derived.sources[0]][0], tuple(derived.build(parts).shape)
        elif self._is_mxfp4(source.key):
            file, stored = self._tensors[f"{source.key}_blocks"][0], self._mxfp4_shape(source.key)
        else:
            file, header = self._tensors[source.key]
            stored = tuple(header.shape)
        try:
            shape = tuple(torch.empty(stored, device="meta")[source.index].shape) if source.index else stored
            return (*shape[:-2], shape[-1], shape[-2]) if source.transposed else shape
        except IndexError:
            raise CheckpointError(
                f"tensor {source.key} in {file.name} has shape {list(stored)}, too small for the part "
                f"{source.index} the model's config implies; the checkpoint does not match its config.json"
            ) from None

    def check(self, source: TensorSource, expected: tuple[int, ...] | None) -> None:
        """Refuse ``source`` unless its header promises the ``expected`` shape (None: any)."""
        shape = self.shape_of(source)
        if expected is not None and shape != tuple(expected):
            part = f" (part {source.index})" if source.index else ""
            raise CheckpointError(
                f"tensor {source.key}{part} in {self._file_of(source.key).name} has shape {list(shape)}, but the "
                f"model's config.json implies {list(expected)}; the checkpoint does not match its config: fix or re-export it"
            )

    def read(self, source: TensorSource, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor (or the indexed part of it) at ``source``, checked against ``expected``; an
        FP8 weight comes back dequantized by its block scales (:mod:`moeq.quant.sources`)."""
        self.check(source, expected)
        source = self._stored(source)
        derived = self._loaded.get(source.key)
        if isinstance(derived, DerivedTensor):  # built whole, then indexed; the last one kept for the next expert's read
            if self._built[0] != source.key:
                self._built = (source.key, derived.build([self.read(TensorSource(key)) for key in derived.sources]))
            built = self._built[1]
            tensor = built[source.index].contiguous() if source.index else built
        elif self._is_mxfp4(source.key):
            tensor = self._read_mxfp4(source)
        else:
            file, header = self._tensors[source.key]
            tensor = self._read_fp8(source, file) if header.dtype.startswith("F8_") else self._read_raw(source, file)
        return tensor.transpose(-1, -2).contiguous() if source.transposed else tensor

    def _file_of(self, key: str) -> Path:
        disk = self._loaded.get(key, key)
        if isinstance(disk, DerivedTensor):
            disk = disk.sources[0]
        return self._tensors[f"{disk}_blocks" if self._is_mxfp4(disk) else disk][0]

    def _read_mxfp4(self, source: TensorSource) -> torch.Tensor:
        """MXFP4 ``X_blocks``/``X_scales`` as transformers' gpt-oss parameter ``X`` (dequantized, last
        two axes swapped); only the indexed expert's blocks are read when the index starts with one."""
        from ..quant.sources import dequantize_mxfp4

        key = source.key
        head = source.index[:1] if source.index and isinstance(source.index[0], int) else ()
        blocks = self._read_raw(TensorSource(f"{key}_blocks", head), self._file_of(key))
        scales = self._read_raw(TensorSource(f"{key}_scales", head), self._tensors[f"{key}_scales"][0])
        try:
            dense = dequantize_mxfp4(blocks, scales, torch.bfloat16).transpose(-1, -2)
        except ValueError as err:
            raise CheckpointError(f"tensor {key}_blocks in {self._file_of(key).name}: {err}") from None
        rest = source.index[len(head):]
        return dense[rest].contiguous() if rest else dense.contiguous()

    def _read_fp8(self, source: TensorSource, file: Path) -> torch.Tensor:
        from ..quant.sources import dequantize_fp8_blocks

        key = source.key
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith("weight") else None
        if self.fp8_block is None or scale_key not in self._tensors:
            raise CheckpointError(
                f"tensor {key} in {file.name} is float8 without block scales (a {scale_key or key + '_scale_inv'} tensor and "
                "quantization_config.weight_block_size in config.json); moeq reads FP8 checkpoints in DeepSeek-V3's block-scaled layout"
            )
        if len(self._tensors[key][1].shape) != 2:
            raise CheckpointError(f"tensor {key} in {file.name} is a {len(self._tensors[key][1].shape)}-D float8 tensor; "
                                  "moeq reads block-scaled FP8 weights stored one 2-D matrix per tensor")
        weight = self._read_raw(TensorSource(key), file)
        scales = self._read_raw(TensorSource(scale_key), self._tensors[scale_key][0])
        try:
            dense = dequantize_fp8_blocks(weight, scales, self.fp8_block, name=f"tensor {key} in {file.name}")
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        return dense[source.index] if source.index else dense

    def _read_raw(self, source: TensorSource, file: Path) -> torch.Tensor:
        try:
            # Opened per read and closed after it: a long-lived memory map would keep every page
            # read so far resident in this process, and its memory would grow with the checkpoint.
            with safe_open(str(file), framework="pt") as handle:
                piece = handle.get_slice(source.key)
                tensor = piece[source.index] if source.index else piece[:]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"could not read tensor {source.key} from {file} ({err}); the file is missing, truncated or corrupt: restore it"
            ) from None
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def first_present(self, sources: list[TensorSource], what: str) -> TensorSource:
        """The first of ``sources`` present in the checkpoint; an error lists them all if none is."""
        for source in sources:
            if source.key in self:
                return source
        names = ", ".join(sorted({s.key for s in sources}))
        raise CheckpointError(f"{self.folder} has no tensor for {what} (looked for {names})")

    def read_first(self, sources: list[TensorSource], what: str, expected: tuple[int, ...] | None = None) -> torch.Tensor:
        """The first of ``sources`` present in the checkpoint, checked against ``expected``."""
        return self.read(self.first_present(sources, what), expected)


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own parameters and persistent buffers (not its children's)."""
    tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return [(name, tensor) for name, tensor in tensors if name not in module._non_persistent_buffers_set]


@dataclasses.dataclass
class LazyModel:
    """A checkpoint opened without loading it: config, meta skeleton, adapter and lazy MoE layers."""

    folder: Path
    config: object
    skeleton: nn.Module
    adapter: MoEAdapter
    layers: list[MoELayer]
    reader: LazyCheckpoint

    def _tensor_source(self, name: str) -> TensorSource:
        sources = self.adapter.tensor_sources(name)
        tied = (getattr(self.skeleton, "all_tied_weights_keys", None) or {}).get(name)
        if tied:
            sources += self.adapter.tensor_sources(tied)
        return self.reader.first_present(sources, name)

    def _expected_shape(self, name: str) -> tuple[int, ...]:
        module, _, leaf = name.rpartition(".")
        return tuple(getattr(self.skeleton.get_submodule(module), leaf).shape)

    def read_tensor(self, name: str) -> torch.Tensor:
        """A non-expert tensor by its module path (or the on-disk spellings, or its tied source),
        refused unless it has the shape the model's config implies."""
        return self.reader.read(self._tensor_source(name), self._expected_shape(name))

    def check_tensors(self) -> None:
        """Every tensor the model needs is present with the shape its config implies; headers only,
        so a quantization run refuses a bad checkpoint before it starts, not hours into it."""
        experts = tuple(layer.experts_path + "." for layer in self.layers)
        for name in self.skeleton.state_dict(keep_vars=True):
            if not name.startswith(experts):
                self.reader.check(self._tensor_source(name), self._expected_shape(name))
        for layer in self.layers:
            for expert in range(layer.num_experts):
                for projection in layer.projections:
                    what = f"expert {expert} {projection} of {layer.path}"
                    source = self.reader.first_present(self.adapter.expert_sources(layer, expert, projection), what)
                    self.reader.check(source, layer.shapes[projection])
                    if layer.expert_bias is not None:
                        source = self.reader.first_present(self.adapter.bias_sources(layer, expert, projection), f"the bias of {what}")
                        self.reader.check(source, layer.shapes[projection][:1])

    @torch.no_grad()
    def materialize(self, path: str) -> nn.Module:
        """Give the skeleton's module at ``path`` real CPU tensors read from the checkpoint.

        Routed experts inside it are filled through the adapter (either on-disk layout); every
        other parameter and persistent buffer is read by name. Call :meth:`release` when done.
        """
        module = self.skeleton.get_submodule(path)
        for sub_name, sub in module.named_modules():
            if sub._non_persistent_buffers_set:
                full = f"{path}.{sub_name}".rstrip(".")
                raise CheckpointError(f"{full} has computed buffers; materializing it from the checkpoint is not supported")
        module.to_empty(device="cpu")
        experts_paths = {layer.experts_path: layer for layer in self.layers}
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = f"{path}.{name}"
            owner = next((p for p in experts_paths if key.startswith(p + ".")), None)
            if owner is not None:
                continue
            tensor.data.copy_(self.read_tensor(key))
        for experts_path, layer in experts_paths.items():
            if experts_path == path or experts_path.startswith(path + "."):
                self.adapter.fill_experts(self.skeleton.get_submodule(experts_path), layer)
        return module

    @torch.no_grad()
    def materialize_own(self, path: str) -> None:
        """Give the module at ``path`` its own parameters and persistent buffers (not its children's)
        read from the checkpoint: a decoder body may hold some it applies before its first block
        (ZAYA's input scale and bias). :meth:`release_own` returns them to the meta device."""
        module = self.skeleton.get_submodule(path)
        for name, tensor in _own_tensors(module):
            value = self.read_tensor(f"{path}.{name}".lstrip("."))
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(value, requires_grad=False))
            else:
                module._buffers[name] = value

    def release_own(self, path: str) -> None:
        module = self.skeleton.get_submodule(path)
        for name, tensor in _own_tensors(module):
            meta = torch.empty_like(tensor, device="meta")
            if isinstance(tensor, nn.Parameter):
                setattr(module, name, nn.Parameter(meta, requires_grad=False))
            else:
                module._buffers[name] = meta

    def release(self, path: str) -> None:
        """Return the module at ``path`` to the meta device, freeing its memory."""
        self.skeleton.get_submodule(path).to_empty(device="meta")
        self._retie()

    def _retie(self) -> None:
        # to_empty gives a module new parameter objects, which unties weights shared with other
        # modules (an input embedding and a tied output head): tie them again.
        if getattr(self.skeleton.config, "tie_word_embeddings", False) and hasattr(self.skeleton, "tie_weights"):
            self.skeleton.tie_weights()


def open_lazy(folder: str | Path) -> LazyModel:
    """Open the checkpoint at ``folder`` for lazy reading of its routers and experts."""
    from ..models import get_adapter

    raw = read_config(folder)
    get_adapter(raw.get("model_type"))
    skeleton = meta_skeleton(folder)
    config = skeleton.config
    adapter, meta_layers = moe_layers_or_error(skeleton)
    stored = source_quantization(raw, folder) or {}
    block = stored.get("weight_block_size")
    reader = LazyCheckpoint(folder, tuple(block) if block else None, mxfp4=stored.get("quant_method") == "mxfp4")
    reader.use_loaded_names(adapter.loaded_names(reader.keys()))
    layers = []
    for layer in meta_layers:
        router = None if layer.router_weight is None else reader.read_first(
            adapter.router_sources(layer), f"the router of {layer.path}", tuple(layer.router_weight.shape))

        def expert_weight(expert: int, projection: str, layer: MoELayer = layer) -> torch.Tensor:
            sources = adapter.expert_sources(layer, expert, projection)
            return reader.read_first(sources, f"expert {expert} {projection} of {layer.path}", layer.shapes[projection])

        def expert_bias(expert: int, projection: str, layer: MoELayer = layer) -> torch.Tensor:
            sources = adapter.bias_sources(layer, expert, projection)
            return reader.read_first(sources, f"the bias of expert {expert} {projection} of {layer.path}", layer.shapes[projection][:1])

        layers.append(dataclasses.replace(layer, router_weight=router, expert_weight=expert_weight,
                                          expert_bias=expert_bias if layer.expert_bias is not None else None))
    return LazyModel(Path(folder), config, skeleton, adapter, layers, reader)
