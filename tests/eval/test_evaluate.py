"""Every metric against a hand computation on a tiny model."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moeq
from moeq.config import QuantConfig
from moeq.eval.api import evaluate, windows
from moeq.models.tiny import tiny_model


def test_windows_score_every_token_once() -> None:
    ids = torch.arange(10)
    disjoint = windows(ids, 4, 4)
    assert [(w.tolist(), f) for w, f in disjoint] == [([0, 1, 2, 3], 1), ([4, 5, 6, 7], 1), ([8, 9], 1)]
    sliding = windows(ids, 4, 2)
    scored = torch.cat([w[f:] for w, f in sliding]).tolist()
    assert scored == list(range(1, 10))  # every token after the very first, once
    with pytest.raises(ValueError, match="stride"):
        windows(ids, 4, 5)


def test_perplexity_kl_and_agreement_by_hand() -> None:
    model = tiny_model("mixtral")
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(0))
    report = evaluate(model, ids, reference=model, seq_len=20)
    with torch.no_grad():
        logits = torch.cat([model(input_ids=ids[None, i : i + 20]).logits[0, :-1] for i in (0, 20)])
    targets = torch.cat([ids[1:20], ids[21:40]])
    assert report.tokens_scored == 38
    assert report.perplexity == pytest.approx(math.exp(float(F.cross_entropy(logits, targets))), rel=1e-5)
    assert report.kl_to_reference == pytest.approx(0.0, abs=1e-7)
    assert report.routing_agreement == [1.0, 1.0]
    assert [sum(row) for row in report.expert_load] == [80, 80]  # 40 tokens x top-2 per layer
    expected_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert report.bytes_in_memory == expected_bytes and report.tokens_per_second > 0


def test_quantized_model_against_its_reference(tmp_path: Path) -> None:
    reference = tiny_model("olmoe")
    quantized = moeq.quantize(tiny_model("olmoe"), QuantConfig(bits=2))
    moeq.save(quantized, tmp_path / "q")
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(1))
    report = evaluate(tmp_path / "q", ids, reference=reference, seq_len=32)
    with torch.no_grad():
        p = F.log_softmax(reference(input_ids=ids[None, :32]).logits[0, :-1], -1)
        q = F.log_softmax(quantized(input_ids=ids[None, :32]).logits[0, :-1], -1)
    first_window_kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert report.kl_to_reference > 0 and report.kl_to_reference == pytest.approx(first_window_kl, rel=0.5)
    # The first MoE layer's router sees unquantized inputs (its own experts come after it).
    assert report.routing_agreement[0] == 1.0 and 0.0 <= report.routing_agreement[1] <= 1.0
    assert report.bytes_on_disk == (tmp_path / "q" / "model.safetensors").stat().st_size
    assert report.bytes_in_memory < sum(t.numel() * t.element_size() for t in reference.state_dict().values())


def test_routing_agreement_by_hand() -> None:
    import copy

    model = tiny_model("mixtral")
    changed = copy.deepcopy(model)
    with torch.no_grad():  # a different router in the last layer only: its inputs stay identical
        changed.model.layers[1].mlp.gate.weight.mul_(-1.0).add_(0.05)
    ids = torch.randint(0, 256, (32,), generator=torch.Generator().manual_seed(4))
    report = evaluate(changed, ids, reference=model, seq_len=32)
    seen = []
    handle = model.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids[None])
    handle.remove()
    mine = changed.model.layers[1].mlp.gate(seen[0])[2].sort(-1).values
    theirs = model.model.layers[1].mlp.gate(seen[0])[2].sort(-1).values
    expected = float((mine == theirs).all(-1).float().mean())
    assert report.routing_agreement[0] == 1.0
    assert report.routing_agreement[1] == pytest.approx(expected) and expected < 1.0


def test_cli_eval(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moeq.cli import app
    from tests.conftest import SAMPLE_TEXT, add_tokenizer

    tiny_model("qwen3_moe").save_pretrained(tmp_path / "fp")
    add_tokenizer(tmp_path / "fp")
    moeq.save(moeq.quantize(tiny_model("qwen3_moe"), QuantConfig(bits=3)), tmp_path / "q", source=tmp_path / "fp")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "q"), "--reference", str(tmp_path / "fp"),
                                      "--data", str(tmp_path / "text.txt"), "--seq-len", "64", "--json", str(tmp_path / "r.json")],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "KL to reference" in result.output and "expert load" in result.output
    assert (tmp_path / "r.json").read_text().count("perplexity") == 2
    fast = CliRunner().invoke(app, ["eval", str(tmp_path / "q"), "--data", str(tmp_path / "text.txt"), "--seq-len", "64",
                                    "--backend", "cpu-int4", "--json", str(tmp_path / "fast.json")])
    assert fast.exit_code == 0, fast.output
    lean, fast = (json.loads((tmp_path / name).read_text()) for name in ("r.json", "fast.json"))
    assert fast["perplexity"] == pytest.approx(lean["perplexity"], rel=1e-4)
    assert lean["kernel_copy_bytes"] == 0 < fast["kernel_copy_bytes"]  # the int4 copy is reported, not hidden
    wrong = CliRunner().invoke(app, ["eval", str(tmp_path / "q"), "--data", str(tmp_path / "text.txt"), "--backend", "gpu"])
    assert wrong.exit_code != 0 and "unknown experts backend 'gpu'" in wrong.output
