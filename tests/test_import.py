"""Importing moeq is lean: no CUDA initialisation, no Triton, and transformers learns 'moeq'."""

import subprocess
import sys


def test_import_does_not_touch_cuda_or_triton() -> None:
    # transformers itself imports triton when some optional packages (hqq) are installed: only
    # moeq's own imports are checked, against what torch and transformers' quantizers load.
    code = (
        "import sys, torch, transformers.quantizers.auto; before = set(sys.modules); import moeq; "
        "assert not torch.cuda.is_initialized(); "
        "assert not any(m.split('.')[0] == 'triton' for m in set(sys.modules) - before); "
        "assert 'moeq.kernels.triton_moe' not in sys.modules; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING; "
        "assert 'moeq' in AUTO_QUANTIZER_MAPPING and 'moeq' in AUTO_QUANTIZATION_CONFIG_MAPPING"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
