"""Importing moeq is lean: no CUDA initialisation, no Triton, and transformers learns 'moeq'."""

import subprocess
import sys


def test_import_does_not_touch_cuda_or_triton() -> None:
    code = (
        "import sys, torch, moeq; "
        "assert not torch.cuda.is_initialized(); "
        "assert 'triton' not in sys.modules; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING; "
        "assert 'moeq' in AUTO_QUANTIZER_MAPPING and 'moeq' in AUTO_QUANTIZATION_CONFIG_MAPPING"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
