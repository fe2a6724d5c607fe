"""Triton kernels run on CPU tensors through Triton's interpreter; it must be on before triton.jit runs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
