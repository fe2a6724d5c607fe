"""The same model, plan and seed give the same bytes as before the one-road rework.

The digests below were computed by the code at commit ee5323a (before this rework) from the same
tiny models and calls; every road must still write exactly those tensors: rounding while
streaming (uniform, grouped with the clipping search and attention), GPTQ, and plans made by
router-maxvar and auto. A change that alters them must say why and update them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeq.allocate import allocate
from moeq.calibrate.runner import CalibrationConfig, quantize_calibrated
from moeq.config import QuantConfig, uniform_plan
from moeq.io.streaming import quantize_checkpoint
from moeq.models.tiny import tiny_model

BEFORE = {
    "rtn3_mixtral": "acf325625b91e97cf1e601c96d8d84e9de7a12c00b536d8f11bf730f397ce1ff",
    "rtn2_g32_attn4_deepseek": "60ac97416bd522a04d5b51f4be98f3b6f7e40fe3b4998f518f6abe73d1dc2278",
    "gptq3_olmoe": "bb287cfeb4dc6c5fa1ed203a1b789377611746dcefbe55b930f6f58d4755159b",
    "router_maxvar_2.5_mixtral": "94795a9f0aa5d115bf9c8cc831aaa6f2a22a8571c1cf4820f6f1914eceb770ab",
    "auto_2.5_mixtral": "204dda3a3d80075091de216b6269c8485e2126095f50b3c6744845e6606b15a2",
}


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(name.encode() + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.int16 if tensor.dtype == torch.bfloat16 else torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("golden")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    mixtral, deepseek, olmoe = tiny_model("mixtral"), tiny_model("deepseek_v3"), tiny_model("olmoe")
    for name, model in (("mixtral", mixtral), ("ds", deepseek), ("olmoe", olmoe)):
        model.save_pretrained(root / name)
    quantize_checkpoint(root / "mixtral", uniform_plan(mixtral, QuantConfig(bits=3)), root / "q1")
    grouped = QuantConfig(bits=2, group_size=32, attn_bits=4, clip_search=True)
    quantize_checkpoint(root / "ds", uniform_plan(deepseek, grouped), root / "q2")
    quantize_calibrated(root / "olmoe", uniform_plan(olmoe, QuantConfig(bits=3)), ids, root / "q3", CalibrationConfig(min_tokens=4))
    quantize_checkpoint(root / "mixtral", allocate(root / "mixtral", "router-maxvar", avg_bits=2.5), root / "q4")
    quantize_checkpoint(root / "mixtral", allocate(root / "mixtral", "auto", avg_bits=2.5, calibration=ids), root / "q5")
    names = ("rtn3_mixtral", "rtn2_g32_attn4_deepseek", "gptq3_olmoe", "router_maxvar_2.5_mixtral", "auto_2.5_mixtral")
    return {name: _digest(root / f"q{i}") for i, name in enumerate(names, start=1)}


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_the_bytes_are_those_of_before(outputs: dict[str, str], case: str) -> None:
    assert outputs[case] == BEFORE[case]
