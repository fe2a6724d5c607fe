"""`moeq generate` continues a prompt with a quantized folder on each CPU backend, and says how fast."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.config import QuantConfig
from moeq.eval.generate import generate_text
from moeq.models.tiny import tiny_model
from tests.conftest import add_tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    tiny_model("mixtral").save_pretrained(root / "fp")
    add_tokenizer(root / "fp")
    moeq.save(moeq.quantize(tiny_model("mixtral"), QuantConfig(bits=4)), root / "q", source=root / "fp")
    return {"fp": root / "fp", "q": root / "q"}


def test_greedy_continuations_agree_across_cpu_backends(folders) -> None:
    lean = generate_text(folders["q"], "the quick brown", max_new_tokens=8, backend="cpu")
    fast = generate_text(folders["q"], "the quick brown", max_new_tokens=8, backend="cpu-int4")
    assert lean.new_tokens == fast.new_tokens == 8
    assert (lean.backend, fast.backend) == ("cpu", "cpu-int4")
    assert lean.kernel_copy_bytes == 0 < fast.kernel_copy_bytes
    assert lean.text == fast.text  # float32: the int4 kernel matches the dequantized product to ~1e-6


def test_cli_generate_prints_the_text_and_the_speed(folders) -> None:
    result = CliRunner().invoke(app, ["generate", str(folders["fp"]), "--prompt", "the quick", "--max-new-tokens", "5",
                                      "--temperature", "0.8"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("the quick") and "5 tokens in" in result.output and "tokens/s" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "gpu"], "unknown experts backend 'gpu'"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    ],
)
def test_cli_generate_refuses_bad_options_in_one_line(folders, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["generate", str(folders["q"]), "--prompt", "x", *args], env={"COLUMNS": "200"})
    assert result.exit_code != 0 and message in result.output


def test_a_folder_without_tokenizer_is_named(tmp_path: Path) -> None:
    tiny_model("mixtral").save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="has no usable tokenizer files"):
        generate_text(tmp_path / "bare", "x")


def test_an_unknown_backend_is_refused_for_an_unquantized_model_too(folders) -> None:
    with pytest.raises(ValueError, match="unknown experts backend 'gpu'"):
        generate_text(folders["fp"], "x", backend="gpu")
