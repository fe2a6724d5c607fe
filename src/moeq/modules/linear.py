"""QuantizedLinear: a linear layer whose weight is stored packed (see QuantizedTensor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import TensorSpec
from ..quant.pack import packed_nbytes
from ..quant.rtn import resolve_group_size
from ..quant.schemes import Scheme
from ..quant.tensor import QuantizedTensor, storage_nbytes

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """``y = x W'^T + b`` with ``W'`` the dequantized packed weight.

    Buffers (saved in the checkpoint): ``codes`` uint8 ``[ceil(out*in*bits/8)]``, ``scales``
    ``[out, G]``, and for ``asym`` ``zeros`` uint8 ``[out, G]``; ``bias`` stays a float parameter.
    Built empty from a spec (as ``from_pretrained`` needs, on the meta device) and filled with
    :meth:`load_quantized`.
    """

    TENSOR_NAMES = ("codes", "scales", "zeros")  # the packed storage, as named in checkpoints

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: TensorSpec,
        scale_dtype: torch.dtype = torch.float16,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.weight_dtype = dtype or torch.get_default_dtype()
        self.group_size = resolve_group_size(in_features, spec.group_size, spec.scheme)
        groups = in_features // self.group_size
        shape = (out_features, in_features)
        self.register_buffer("codes", torch.empty(storage_nbytes(shape, spec.bits, self.group_size, spec.scheme, 0) if spec.scheme.is_kquant
                                                  else packed_nbytes(in_features * out_features, spec.bits), dtype=torch.uint8))
        if spec.scheme.is_kquant:  # scales live inside the GGML blocks
            self.scales = None
        else:
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=scale_dtype))
        if spec.scheme.zero_dtype is not None:
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=spec.scheme.zero_dtype))
        else:
            self.zeros = None
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None

    @property
    def quantized(self) -> QuantizedTensor:
        """A QuantizedTensor view of the buffers (no copy)."""
        return QuantizedTensor(
            codes=self.codes,
            scales=self.scales,
            zeros=self.zeros,
            bits=self.spec.bits,
            group_size=self.group_size,
            scheme=self.spec.scheme,
            shape=(self.out_features, self.in_features),
            dtype=self.weight_dtype,
        )

    def load_quantized(self, tensor: QuantizedTensor) -> None:
        """Copy a QuantizedTensor of matching shape and spec into the buffers."""
        expected = (self.spec.bits, self.spec.scheme, self.group_size, (self.out_features, self.in_features))
        got = (tensor.bits, tensor.scheme, tensor.group_size, tensor.shape)
        if got != expected:
            raise ValueError(f"quantized tensor {got} does not match this layer's spec {expected}")
        self.codes = tensor.codes.clone()
        if self.scales is not None:
            self.scales = tensor.scales.to(self.scales.dtype).clone()
        if self.zeros is not None:
            self.zeros = tensor.zeros.clone()

    def weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        return self.quantized.dequantize(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the original dtype, for code that inspects ``.weight``
        (Switch's feed-forward reads its dtype). Costs a dequantization per access."""
        return self.quantized.dequantize(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_for(x.dtype), self.bias)

    def extra_repr(self) -> str:
        s = self.spec
        return f"in={self.in_features}, out={self.out_features}, bits={s.bits}, scheme={s.scheme.value}, group={self.group_size}"
