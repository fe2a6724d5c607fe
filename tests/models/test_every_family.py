"""Every MoE model type of the installed transformers that uses its experts interface and has a
causal-LM class, enumerated (not hand-picked), each built tiny from its own config class: quantized
at 3 bits, saved, and read back by ``moeq.load``, by transformers' ``from_pretrained`` and by
quantizing its own saved checkpoint block by block; all three give the in-memory quantized
model's logits exactly, and those stay close to full precision. The types that cannot work yet
are listed in ``tests/models/families.py`` with the line moeq refuses them with; README's family
list is checked against this result (``python benchmarks/families.py`` writes it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeq.models import AdapterError
from tests.models.families import UNSUPPORTED, check_family, experts_interface_types

TYPES = experts_interface_types()
CAUSAL = [t for t in TYPES if t.causal_lm]


def test_the_enumeration_finds_the_experts_interface_models() -> None:
    assert len(CAUSAL) >= 50 and {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "glm4_moe"} <= {t.model_type for t in CAUSAL}
    assert all(t.reason for t in TYPES if not t.causal_lm)  # the others say what they are instead
    assert set(UNSUPPORTED) <= {t.model_type for t in CAUSAL}
    assert len(CAUSAL) - len(UNSUPPORTED) >= 40  # the goal


@pytest.mark.parametrize("model_type", [t.model_type for t in CAUSAL])
def test_every_experts_interface_model_quantizes_saves_and_loads(model_type: str, tmp_path: Path) -> None:
    expected = UNSUPPORTED.get(model_type)
    try:
        check_family(model_type, tmp_path)
    except (AdapterError, ValueError) as err:  # what moeq refuses, in one line
        if expected is None:
            raise
        assert expected in str(err) and len(str(err).splitlines()) == 1, str(err)
        return
    assert expected is None, f"{model_type} is listed as unsupported but now works: take it off UNSUPPORTED"


def test_readme_lists_exactly_the_families_that_pass() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- families:begin -->(.*?)<!-- families:end -->", readme, re.S)
    assert block, "README.md lost its generated family list; run python benchmarks/families.py"
    passing_line = next(line for line in block.group(1).splitlines() if line.startswith("Read and tested"))
    listed = set(re.findall(r"`([a-z0-9_]+)`", passing_line))
    passing = {t.model_type for t in CAUSAL} - set(UNSUPPORTED)
    assert listed == passing, f"README differs by {sorted(listed ^ passing)}: run python benchmarks/families.py"
