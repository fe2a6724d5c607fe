"""The command line: quantize and info end to end, and one-line errors for bad input."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.config import QuantConfig, uniform_plan
from moeq.models.tiny import tiny_model
from tests.conftest import logits, one_line_error

runner = CliRunner()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_quantize_then_info(source_folder: Path, tmp_path: Path, family: str) -> None:
    before = _digest(source_folder)
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(source_folder), "--out", str(out), "--bits", "3"])
    assert result.exit_code == 0, result.output
    assert _digest(source_folder) == before, "the source checkpoint must never change"
    expected = moeq.quantize(tiny_model(family), QuantConfig(bits=3))
    assert torch.equal(logits(moeq.load(out)), logits(expected))
    info = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert info.exit_code == 0, info.output
    assert "layer 1" in info.output and "mean expert bits" in info.output and "3.000" in info.output
    ratio_rows = [line for line in info.output.splitlines() if line.strip().startswith("│") and "x │" in line]
    assert len(ratio_rows) == 16  # 2 layers x 8 experts


def test_quantize_with_a_mixed_plan(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    plan = uniform_plan(tiny_model("mixtral"), QuantConfig(bits=2))
    for entry in plan.experts[:6]:
        object.__setattr__(entry, "spec", type(entry.spec)(4, "sym"))
    plan.save(tmp_path / "plan.json")
    result = runner.invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q"), "--plan", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(tmp_path / "q")], env={"COLUMNS": "200"})
    assert "4 │" in info.output and "2 │" in info.output


def test_errors_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("olmoe").save_pretrained(source)
    out = tmp_path / "out"
    dense = tmp_path / "dense"
    transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)
    ).save_pretrained(dense)
    corrupt = tmp_path / "corrupt"
    tiny_model("olmoe").save_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01garbage")
    cases = [
        (["quantize", str(dense), "--out", str(out), "--bits", "3"], "'llama' has no moeq adapter and no routed experts moeq can find by structure"),
        (["quantize", str(tmp_path / "nowhere"), "--out", str(out), "--bits", "3"], "does not exist"),
        (["quantize", str(source), "--out", str(out)], "give exactly one of --bits"),
        (["quantize", str(source), "--out", str(out), "--bits", "11"], "--bits must be 1 to 8"),
        (["quantize", str(source), "--out", str(out), "--bits", "1", "--scheme", "sym"], "'sym' takes 2 to 8 bits"),
        (["quantize", str(source), "--out", str(out), "--plan", str(tmp_path / "none.json")], "does not exist"),
        (["quantize", str(corrupt), "--out", str(out), "--bits", "3"], "model.safetensors is not a readable safetensors file"),
        (["quantize", str(source), "--out", str(source), "--bits", "3"], "is the input"),
        (["info", str(dense)], "'llama' has no moeq adapter"),  # a model folder moeq cannot quantize
    ]
    for args, message in cases:
        line = one_line_error(runner.invoke(app, args))
        assert message in line, (args, line)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt", "dense", "src"]


def test_already_quantized_source_is_refused(tmp_path: Path) -> None:
    moeq.save(moeq.quantize(tiny_model("mixtral"), QuantConfig(bits=3)), tmp_path / "q")
    line = one_line_error(runner.invoke(app, ["quantize", str(tmp_path / "q"), "--out", str(tmp_path / "q2"), "--bits", "2"]))
    assert "already quantized (moeq)" in line


def test_plan_is_recorded_with_seed(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    result = runner.invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q"), "--bits", "4", "--seed", "7",
                                 "--group-size", "32", "--attn-bits", "8"])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["plan"]
    assert plan["method"]["seed"] == 7 and plan["method"]["config"]["group_size"] == 32
    assert len(plan["linears"]) == 8


@pytest.mark.parametrize("command", ["quantize", "info", "demo"])
def test_help(command: str) -> None:
    assert runner.invoke(app, [command, "--help"]).exit_code == 0


def test_allocate_writes_a_plan_and_a_heatmap(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    tiny_model("mixtral", seed=3).save_pretrained(tmp_path / "init")
    result = runner.invoke(
        app,
        ["allocate", str(source), "--avg-bits", "2.25", "--levels", "3,2,1", "--reference", str(tmp_path / "init"),
         "--out", str(tmp_path / "plan.json"), "--heatmap", str(tmp_path / "plan.png")],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "router_norm_change" in result.output and "mean expert bits 2.25" in result.output
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["method"]["strategy"] == "router-maxvar" and "reference" in plan["method"]["router_signal"]
    quantized = runner.invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q"), "--plan", str(tmp_path / "plan.json")])
    assert quantized.exit_code == 0, quantized.output


def test_quantize_allocates_in_one_go(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("olmoe").save_pretrained(source)
    result = runner.invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q"), "--avg-bits", "2.5", "--strategy", "router-maxvar"])
    assert result.exit_code == 0, result.output
    plan = moeq.read_plan(tmp_path / "q")
    assert plan.method["strategy"] == "router-maxvar" and plan.budget["avg_expert_bits"] == pytest.approx(2.5)


def test_allocate_errors_are_one_line(tmp_path: Path) -> None:
    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    cases = [
        (["--avg-bits", "2.5", "--strategy", "magic"], "unknown strategy 'magic'"),
        ([], "give exactly one budget"),
        (["--avg-bits", "4"], "outside the levels"),
        (["--avg-bits", "2", "--levels", "4,2,1"], "equally spaced"),
        (["--avg-bits", "2", "--levels", "three"], "--levels takes comma-separated"),
        (["--max-bytes", "1000"], "impossible"),
        (["--avg-bits", "2.5", "--strategy", "pmq"], "needs calibration text"),
    ]
    for extra, message in cases:
        line = one_line_error(runner.invoke(app, ["allocate", str(source), "--out", str(tmp_path / "p.json"), *extra]))
        assert message in line, (extra, line)
    assert not (tmp_path / "p.json").exists()


def test_calibrated_strategies_from_a_text_file(tmp_path: Path) -> None:
    from tests.conftest import SAMPLE_TEXT, add_tokenizer

    source = tmp_path / "src"
    tiny_model("qwen2_moe").save_pretrained(source)
    add_tokenizer(source)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT)
    for strategy in ("frequency", "routing-weight", "pmq"):
        result = runner.invoke(app, ["allocate", str(source), "--avg-bits", "2.5", "--strategy", strategy,
                                     "--calib", str(tmp_path / "calib.txt"), "--out", str(tmp_path / f"{strategy}.json")],
                               env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        plan = json.loads((tmp_path / f"{strategy}.json").read_text())
        assert plan["method"]["calibration"]["tokens"] > 0 and "frequency" in plan["scores"]


def test_quantize_with_gptq_from_the_command_line(tmp_path: Path) -> None:
    from tests.conftest import SAMPLE_TEXT, add_tokenizer

    source = tmp_path / "src"
    tiny_model("deepseek_v3").save_pretrained(source)
    add_tokenizer(source)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 4)
    result = runner.invoke(
        app,
        ["quantize", str(source), "--out", str(tmp_path / "q"), "--avg-bits", "2.5", "--strategy", "router-maxvar",
         "--quantizer", "gptq", "--calib", str(tmp_path / "calib.txt"), "--calib-tokens", "4096", "--seq-len", "64",
         "--group-size", "32", "--dense-bits", "4", "--min-tokens", "8"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "tokens routed to each expert" in result.output
    plan = moeq.read_plan(tmp_path / "q")
    assert plan.method["quantizer"]["name"] == "gptq" and plan.method["strategy"] == "router-maxvar"
    loaded = moeq.load(tmp_path / "q")
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"  # the dense first layer
    assert torch.isfinite(logits(loaded)).all()
    line = one_line_error(runner.invoke(app, ["quantize", str(source), "--out", str(tmp_path / "q2"), "--bits", "3", "--quantizer", "gptq"]))
    assert "needs calibration text" in line


def test_an_interrupted_quantize_resumes(tmp_path: Path) -> None:
    from moeq.io.streaming import quantize_checkpoint

    source = tmp_path / "source"
    model = tiny_model("qwen2_moe")
    model.save_pretrained(source)
    plan = uniform_plan(model, QuantConfig(bits=2))
    plan.save(tmp_path / "plan.json")

    def interrupt(unit: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source, plan, tmp_path / "q", progress=interrupt)
    args = ["quantize", str(source), "--out", str(tmp_path / "q"), "--plan", str(tmp_path / "plan.json")]
    line = one_line_error(runner.invoke(app, args))
    assert "an interrupted run left" in line and "finished before it" not in line  # that hint is for this run's blocks
    assert "add --resume to continue it" in one_line_error(runner.invoke(app, args))
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert torch.equal(logits(moeq.load(tmp_path / "q")), logits(moeq.quantize(model, plan)))


def test_the_guard_prices_a_data_free_plan_beside_auto(tmp_path: Path) -> None:
    from tests.conftest import SAMPLE_TEXT, add_tokenizer

    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    add_tokenizer(source)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 4)
    args = ["allocate", str(source), "--avg-bits", "2.5", "--calib", str(tmp_path / "calib.txt"), "--calib-tokens", "2048",
            "--seq-len", "64"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "rm.json")], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    assert "final router norm" in result.output and "moeq train-router" in result.output  # the proxy is named
    assert "predicted damage" in result.output and "verdict:" in result.output
    for name in ("chosen: router-maxvar", "auto", "uniform", "frequency"):
        assert name in result.output
    assert "2 bits (below budget)" in result.output
    quiet = runner.invoke(app, [*args, "--out", str(tmp_path / "q.json"), "--no-guard"], env={"COLUMNS": "220"})
    assert quiet.exit_code == 0 and "verdict:" not in quiet.output

    auto = runner.invoke(app, [*args, "--strategy", "auto", "--out", str(tmp_path / "auto.json")], env={"COLUMNS": "220"})
    assert auto.exit_code == 0, auto.output
    plan = json.loads((tmp_path / "auto.json").read_text())
    assert plan["method"]["levels"] == [4, 3, 2, 1] and plan["budget"]["avg_expert_bits"] <= 2.5 + 1e-9
    assert plan["budget"]["predicted_damage"] > 0 and plan["scores"]["predicted_damage"]["sensitivity"]
    assert "the chosen plan has the least predicted damage" in auto.output


def test_data_free_allocation_reads_no_text_even_beside_a_tokenizer(tmp_path: Path) -> None:
    from tests.conftest import add_tokenizer

    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    add_tokenizer(source)  # the folder could be calibrated on the default corpus: it must not be, unasked
    for strategy in ("router-maxvar", "router", "variance", "random", "uniform"):
        bits = "2" if strategy == "uniform" else "2.5"
        result = runner.invoke(app, ["allocate", str(source), "--avg-bits", bits, "--strategy", strategy,
                                     "--out", str(tmp_path / f"{strategy}.json")], env={"COLUMNS": "220"})
        assert result.exit_code == 0, result.output
        assert "predicted damage" not in result.output, strategy
        assert "calibration" not in json.loads((tmp_path / f"{strategy}.json").read_text())["method"], strategy
    asked = runner.invoke(app, ["allocate", str(source), "--avg-bits", "2.5", "--calib", "default", "--calib-tokens", "1024",
                                "--seq-len", "64", "--out", str(tmp_path / "asked.json")], env={"COLUMNS": "220"})
    assert asked.exit_code == 0, asked.output
    assert "1,024 tokens of moeq's default corpus" in " ".join(asked.output.split())  # the guard says what it measured on


def test_gptq_without_text_is_refused_before_any_allocation(tmp_path: Path) -> None:
    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    line = one_line_error(runner.invoke(app, ["quantize", str(tmp_path / "src"), "--out", str(tmp_path / "q"), "--avg-bits", "2.5",
                                              "--quantizer", "gptq"]))
    assert "--quantizer gptq needs calibration text" in line
    line = one_line_error(runner.invoke(app, ["quantize", str(tmp_path / "src"), "--out", str(tmp_path / "q"), "--avg-bits", "2.5",
                                              "--quantizer", "gptq", "--calib", str(tmp_path / "missing.txt")]))
    assert "calibration text" in line and "does not exist" in line


def test_one_command_calibrates_allocation_guard_and_gptq_on_one_slice(tmp_path: Path, monkeypatch) -> None:
    from moeq.allocate import damage as damage_module
    from moeq.allocate import guard as guard_module
    from tests.conftest import SAMPLE_TEXT, add_tokenizer

    source = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(source)
    add_tokenizer(source)
    (tmp_path / "calib.txt").write_text(SAMPLE_TEXT * 4)
    tables = []
    real = damage_module.damage_table
    monkeypatch.setattr(guard_module, "damage_table", lambda *a, **k: tables.append("guard") or real(*a, **k))
    result = runner.invoke(app, [
        "quantize", str(source), "--out", str(tmp_path / "q"), "--avg-bits", "2.5", "--strategy", "auto", "--quantizer", "gptq",
        "--calib", str(tmp_path / "calib.txt"), "--calib-tokens", "1024", "--seq-len", "64", "--clip-search", "--min-tokens", "4",
    ], env={"COLUMNS": "220"})
    assert result.exit_code == 0, result.output
    plan = moeq.read_plan(tmp_path / "q")
    calibration = plan.method["calibration"]
    assert calibration["sequences"] * calibration["sequence_length"] == 1024 and calibration["sequence_length"] == 64
    assert "1,024 tokens of" in " ".join(result.output.split())  # the guard measured on the same slice...
    assert tables == []  # ...and priced every plan from the damage table auto had already computed
    assert plan.method["quantizer"]["calibration_tokens"] == 1024  # GPTQ too
    assert all(e.spec.clip_search for e in plan.experts if e.spec.bits > 1)  # --clip-search reached the plan


def test_small_models_run_on_one_thread_unless_told(tmp_path: Path) -> None:
    from moeq.threads import SMALL_MODEL_BYTES, threads_for

    assert threads_for(10**6) == 1 and threads_for(SMALL_MODEL_BYTES) is None and threads_for(10**6, requested=3) == 3
    tiny_model("olmoe").save_pretrained(tmp_path / "src")
    before = torch.get_num_threads()
    try:
        for prefix, expected in (([], 1), (["--threads", "2"], 2)):
            result = runner.invoke(app, [*prefix, "allocate", str(tmp_path / "src"), "--avg-bits", "2.5",
                                         "--out", str(tmp_path / f"p{expected}.json")])
            assert result.exit_code == 0, result.output
            assert torch.get_num_threads() == expected
        assert "--threads must be at least 1" in one_line_error(runner.invoke(app, ["--threads", "0", "allocate", str(tmp_path / "src"),
                                                                                    "--avg-bits", "2.5", "--out", str(tmp_path / "p.json")]))
    finally:
        torch.set_num_threads(before)
