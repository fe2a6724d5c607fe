"""Every model type moeq reads (tests/models/families.py's enumeration), exported for vLLM as
compressed-tensors and read back by transformers' compressed-tensors loader: the same logits as
moeq runs the checkpoint. The types whose published checkpoints keep experts fused are refused
in one line (vLLM's loader reads one linear per expert); README says which are which."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeq.export.weights import ExportError
from tests.models.families import FUSED_ON_DISK, NOT_EXPORTED, UNSUPPORTED, check_compressed_export, experts_interface_types

pytest.importorskip("compressed_tensors")
READ = [t.model_type for t in experts_interface_types() if t.causal_lm and t.model_type not in UNSUPPORTED]


@pytest.mark.parametrize("model_type", READ)
def test_every_family_exports_for_vllm_or_is_refused_in_one_line(model_type: str, tmp_path: Path) -> None:
    if model_type not in NOT_EXPORTED:
        check_compressed_export(model_type, tmp_path)
        return
    with pytest.raises(ExportError) as refused:
        check_compressed_export(model_type, tmp_path)
    assert FUSED_ON_DISK in str(refused.value) and len(str(refused.value).splitlines()) == 1
    assert not (tmp_path / "ct").exists()


def test_readme_lists_exactly_the_families_that_export() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- families:begin -->(.*?)<!-- families:end -->", readme, re.S)
    assert block, "README.md lost its generated family list; run python benchmarks/families.py"
    line = next(line for line in block.group(1).splitlines() if line.startswith("Exported for vLLM"))
    exported, refused = line.split("Refused in one line")
    assert set(re.findall(r"`([a-z0-9_]+)`", exported)) == set(READ) - NOT_EXPORTED, "run python benchmarks/families.py"
    assert set(re.findall(r"`([a-z0-9_]+)`", refused.split("GGUF")[0])) == NOT_EXPORTED
