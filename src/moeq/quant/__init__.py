"""Numerics: schemes, packing, the QuantizedTensor container and the quantizers that fill it."""

from .pack import PackLayout, pack_codes, packed_nbytes, unpack_codes
from .rtn import quantize_rtn
from .schemes import Scheme, check_scheme_bits
from .tensor import QuantizedTensor

__all__ = [
    "PackLayout",
    "QuantizedTensor",
    "Scheme",
    "check_scheme_bits",
    "pack_codes",
    "packed_nbytes",
    "quantize_rtn",
    "unpack_codes",
]
