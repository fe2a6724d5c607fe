"""GGUF export, proven by readers moeq did not write: the ``gguf`` package's own numpy
dequantization (every tensor, exactly) and llama.cpp itself (xllamacpp) running the file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import moeq
from moeq.cli import app
from moeq.demo import DEFAULT_MODEL
from moeq.export import ExportError, export_gguf
from moeq.export.gguf_arch import rope_permute_rows
from moeq.io.source import load_source
from moeq.models import moe_layers_or_error
from moeq.quant.ggml import ggml_blocks
from moeq.quant.rtn import quantize_rtn
from tests.conftest import one_line_error

runner = CliRunner()


@settings(max_examples=40, deadline=None)
@given(
    scheme=st.sampled_from(["sym", "symx", "affine"]),
    bits=st.sampled_from([4, 5, 8]),
    rows=st.integers(1, 9),
    blocks=st.integers(1, 6),
    magnitude=st.sampled_from([1e-4, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_exact_types_dequantize_in_gguf_to_moeqs_weights(scheme, bits, rows, blocks, magnitude, seed) -> None:
    if scheme == "affine" and bits == 8:
        bits = 4  # Q4_1 and Q5_1: there is no Q8_1 a file may hold
    weight = torch.randn(rows, 32 * blocks, generator=torch.Generator().manual_seed(seed)) * magnitude
    tensor = quantize_rtn(weight, bits, scheme, 32)
    kind, data = ggml_blocks(tensor)
    assert data.dtype == np.uint8 and data.shape == (rows, blocks * kind.type_size)
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind.name])
    assert np.array_equal(theirs, tensor.dequantize(torch.float32).numpy())  # bit for bit, no tolerance


@pytest.mark.parametrize("bits", [4, 5])
def test_affine_is_llama_cpps_own_q4_1_q5_1_rule(bits: int) -> None:
    # Q4_1/Q5_1 as llama.cpp quantizes them (the gguf package's port): d = (max - min) / (2^b - 1), m = min
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    kind = gguf.GGMLQuantizationType[f"Q{bits}_1"]
    theirs = gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), kind), kind)
    ours = quantize_rtn(weight, bits, "affine", 32).dequantize(torch.float32).numpy()
    error = lambda w: float(((w - weight.numpy()) ** 2).mean())  # noqa: E731
    # the same rule; moeq encodes with the float16 d and m the file stores, llama.cpp with float32 ones,
    # so 11-14 % of codes differ by one step and the errors agree within 0.1 % (measured +0.002 % / -0.06 %)
    assert error(ours) == pytest.approx(error(theirs), rel=1e-3)
    asym = quantize_rtn(weight, bits, "asym", 32).dequantize(torch.float32).numpy()
    assert error(ours) < error(asym)  # no integer zero point to round, zero not forced into the range


@pytest.mark.parametrize("bits", [4, 5])
def test_symx_is_llama_cpps_own_scale_rule(bits: int) -> None:
    # Q4_0/Q5_0 as llama.cpp quantizes them (the gguf package's port of ggml-quants.c): d = max / -2^(b-1)
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    kind = gguf.GGMLQuantizationType[f"Q{bits}_0"]
    theirs = gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), kind), kind)
    ours = quantize_rtn(weight, bits, "symx", 32)
    error = lambda w: float(((w - weight.numpy()) ** 2).mean())  # noqa: E731
    # the same rule: the same error to 1e-4 (codes differ only where llama.cpp's trunc(x + 8.5) meets a tie)
    assert error(ours.dequantize(torch.float32).numpy()) == pytest.approx(error(theirs), rel=1e-4)
    # the step is 2^(b-1)/(2^(b-1)-1) times finer than sym's, so the error about that squared less
    # (measured 0.80x at 4 bits, 0.89x at 5; the square of the step ratio is 0.77x and 0.88x)
    half = 1 << (bits - 1)
    sym_error = error(quantize_rtn(weight, bits, "sym", 32).dequantize(torch.float32).numpy())
    assert error(ours.dequantize(torch.float32).numpy()) < ((half - 1) / half) ** 2 * 1.05 * sym_error
    assert (ours.scales < 0).any() and (ours.scales > 0).any()


def test_rope_permutation_is_llama_cpps() -> None:
    # llama.cpp's converter: reshape(heads, 2, head_dim / 2, ...) then swap the two middle axes.
    weight = np.arange(24 * 3).reshape(24, 3)
    theirs = weight.reshape(4, 2, 3, 3).swapaxes(1, 2).reshape(24, 3)
    assert np.array_equal(weight[rope_permute_rows(24, 4)], theirs)


@pytest.fixture(scope="module")
def default_q4(tmp_path_factory) -> Path:
    """The default Mixtral, experts at 4-bit sym codes in groups of 32 (GGUF's Q4_0)."""
    out = tmp_path_factory.mktemp("gguf") / "q4"
    source = load_source(DEFAULT_MODEL)
    moeq.save(moeq.quantize(source, moeq.QuantConfig(bits=4, scheme="sym", group_size=32)), out, source=DEFAULT_MODEL)
    return out


def _reader_tensors(path: Path) -> dict[str, object]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_every_tensor_reads_back_in_gguf_as_moeq_holds_it(default_q4: Path, tmp_path: Path) -> None:
    report = export_gguf(default_q4, tmp_path / "m.gguf", float_type="F32")
    model = moeq.load(default_q4)
    tensors = _reader_tensors(report.path)
    _, layers = moe_layers_or_error(model)
    assert report.expert_bits_per_weight == 4.5  # Q4_0: 18 bytes per 32 weights
    for layer in layers:
        experts = model.get_submodule(layer.experts_path)
        for projection, name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            tensor = tensors[f"blk.{layer.index}.{name}.weight"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
            theirs = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            ours = np.stack([experts.expert(e)[projection].weight_for(torch.float32).numpy() for e in range(layer.num_experts)])
            assert theirs.shape == ours.shape and np.array_equal(theirs, ours)
    state = model.state_dict()
    assert np.array_equal(tensors["token_embd.weight"].data, state["model.embed_tokens.weight"].float().numpy())
    assert np.array_equal(tensors["blk.2.ffn_gate_inp.weight"].data, state["model.layers.2.mlp.gate.weight"].float().numpy())
    heads = model.config.num_key_value_heads
    k = state["model.layers.1.self_attn.k_proj.weight"].float().numpy()
    assert np.array_equal(tensors["blk.1.attn_k.weight"].data, k[rope_permute_rows(k.shape[0], heads)])
    assert "output.weight" not in tensors  # tied: llama.cpp reuses the embedding


def test_metadata_is_what_llama_cpp_reads(default_q4: Path, tmp_path: Path) -> None:
    path = export_gguf(default_q4, tmp_path / "m.gguf").path
    reader = gguf.GGUFReader(path)
    config = json.loads((default_q4 / "config.json").read_text())

    def value(key):
        return reader.fields[key].contents()

    assert value("general.architecture") == "llama"
    assert value("llama.expert_count") == config["num_local_experts"]
    assert value("llama.expert_used_count") == config["num_experts_per_tok"]
    assert value("llama.block_count") == config["num_hidden_layers"]
    assert value("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    vocab = json.loads((default_q4 / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(tokens) == config["vocab_size"] and all(tokens[i] == t for t, i in vocab.items())
    assert len(value("tokenizer.ggml.merges")) > 0


def llama_cpp_next_tokens(path: Path, prompts: list) -> list[tuple[int, dict[int, float]]]:
    """Per prompt (token ids, or text llama.cpp tokenizes itself): the number of prompt tokens
    llama.cpp evaluated and its top-10 next-token log-probabilities (empty where it withholds the
    token, e.g. half a UTF-8 character)."""
    xllamacpp = pytest.importorskip("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = 256
    params.n_parallel = 1
    params.cpuparams.n_threads = 1
    server = xllamacpp.Server(params)
    out = []
    for prompt in prompts:
        result = server.handle_completions(
            {"prompt": prompt, "n_predict": 1, "n_probs": 10, "temperature": 0, "post_sampling_probs": False}
        )
        logprobs = result["choices"][0]["logprobs"]
        top = logprobs["content"][0]["top_logprobs"] if logprobs else []
        out.append((result["usage"]["prompt_tokens"], {t["id"]: t["logprob"] for t in top}))
    del server
    return out


def _llama_cpp_logprobs(path: Path, prompts: list[list[int]]) -> list[dict[int, float]]:
    """Top-10 next-token log-probabilities per prompt of token ids from llama.cpp."""
    return [top for _, top in llama_cpp_next_tokens(path, prompts)]


def _moeq_logprobs(checkpoint: Path, prompts: list[list[int]]) -> torch.Tensor:
    model = moeq.load(checkpoint)
    for parameter in model.parameters():  # float32 throughout, as llama.cpp accumulates
        parameter.data = parameter.data.float()
    with torch.no_grad():
        return torch.stack([torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts])


PROMPTS = [torch.randint(1, 4096, (12,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(6)]


def k_plan(source, scheme: str = "q3_k"):
    """gate/up as a K-quant, down (384 inputs: no K-quant divides it) as Q4_0, as llama.cpp falls back."""
    from moeq.plan import BitPlan, ExpertEntry, TensorSpec

    plan = moeq.plan_for(source, moeq.QuantConfig(bits=4, scheme="sym", group_size=32))
    k = TensorSpec(int(scheme[1]), scheme)
    entries = [ExpertEntry(e.layer, e.expert, e.projection, e.spec if e.projection == "down_proj" else k) for e in plan.experts]
    return BitPlan(plan.model_type, plan.layers, entries, plan.linears)


@pytest.mark.parametrize(
    ("plan", "float_type", "tolerance"),
    [
        # Everything in F32: summation order and llama.cpp's float16 key/value cache differ (measured worst 0.0041).
        ("f32", "F32", 0.01),
        # Q4_0 experts, Q8_0 attention (its q/k blocks permuted for llama.cpp's rotary layout), F16
        # elsewhere: llama.cpp's CPU kernels round activations to 8-bit blocks for Q4_0/Q8_0 and to
        # float16 for F16 weights (measured worst 0.064-0.11 over 6-8 prompts).
        ("q4_0", "F16", 0.25),
        # Q3_K gate/up and Q4_0 down (measured worst 0.039-0.091 over 6-8 prompts).
        ("q3_k", "F16", 0.25),
        # Every expert Q1_0 (moeq's sign codes, groups of 128), F32 elsewhere: measured worst 0.056
        # (with the bits of each byte read in the other order: 9.0).
        ("q1_0", "F32", 0.25),
        # Every expert Q4_1 (moeq's affine codes, groups of 32), F32 elsewhere: measured worst 0.048.
        ("q4_1", "F32", 0.25),
    ],
)
def test_llama_cpp_runs_the_export_like_moeq(tmp_path: Path, plan: str, float_type: str, tolerance: float) -> None:
    source = load_source(DEFAULT_MODEL)
    checkpoint = tmp_path / "q"
    if plan == "q3_k":
        config = k_plan(source)
    elif plan == "q1_0":
        config = moeq.QuantConfig(bits=1, scheme="sign", group_size=128)
    elif plan == "q4_1":
        config = moeq.QuantConfig(bits=4, scheme="affine", group_size=32)
    elif plan == "q4_0":
        config = moeq.QuantConfig(bits=4, scheme="sym", group_size=32, attn_bits=8)
    else:
        config = moeq.QuantConfig(bits=16)
    moeq.save(moeq.quantize(source, config), checkpoint, source=DEFAULT_MODEL)
    report = export_gguf(checkpoint, tmp_path / "m.gguf", float_type=float_type)
    assert plan == "f32" or report.type_counts()[plan.upper()] >= 1
    theirs = _llama_cpp_logprobs(report.path, PROMPTS)
    ours = _moeq_logprobs(checkpoint, PROMPTS)
    worst = max(abs(ours[i, token].item() - logprob) for i, top in enumerate(theirs) for token, logprob in top.items())
    assert worst <= tolerance
    assert sum(bool(top) for top in theirs) >= 5
    assert all(max(top, key=top.get) == ours[i].argmax().item() for i, top in enumerate(theirs) if top)


def test_cli_exports_and_refuses_an_existing_file(default_q4: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    result = runner.invoke(app, ["export", str(default_q4), "--out", str(out)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "12 Q4_0" in said and "4.5 bits per weight" in said
    before = out.read_bytes()
    line = one_line_error(runner.invoke(app, ["export", str(default_q4), "--out", str(out)]))
    assert "already exists" in line and out.read_bytes() == before


def _refused(args: list[str], tmp_path: Path, match: str) -> None:
    line = one_line_error(runner.invoke(app, ["export", *args]))
    assert match in line, line
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_a_folder_that_is_not_a_moeq_checkpoint_is_refused(tmp_path: Path) -> None:
    _refused([str(DEFAULT_MODEL), "--out", str(tmp_path / "m.gguf")], tmp_path, "is not a moeq checkpoint")


def test_per_expert_widths_in_one_tensor_are_refused(tmp_path: Path) -> None:
    source = load_source(DEFAULT_MODEL)
    plan = moeq.plan_for(source, moeq.QuantConfig(bits=4, scheme="sym", group_size=32))
    for entry in plan.experts:
        if entry.layer == 1 and entry.expert == 3:
            object.__setattr__(entry, "spec", type(entry.spec)(8, "sym", 32))
    moeq.save(moeq.quantize(source, plan), tmp_path / "q", source=DEFAULT_MODEL)
    _refused([str(tmp_path / "q"), "--out", str(tmp_path / "m.gguf")], tmp_path,
             "layer 1 gate_proj: its experts use 4-bit sym group 32, 8-bit sym group 32, but llama.cpp (GGUF) holds one type per "
             "layer's expert tensor; make the plan with --target gguf")


def test_a_spec_with_no_gguf_type_is_refused(tmp_path: Path) -> None:
    source = load_source(DEFAULT_MODEL)
    moeq.save(moeq.quantize(source, moeq.QuantConfig(bits=4, scheme="asym", group_size=64)), tmp_path / "q", source=DEFAULT_MODEL)
    _refused([str(tmp_path / "q"), "--out", str(tmp_path / "m.gguf")], tmp_path,
             "layer 0 expert 0 gate_proj: 4-bit asym group 64 is not a type llama.cpp (GGUF) runs")


def test_a_family_without_a_gguf_mapping_is_refused(tmp_path: Path) -> None:
    from moeq.models.tiny import tiny_model

    moeq.save(moeq.quantize(tiny_model("switch_transformers"), moeq.QuantConfig(bits=4, scheme="sym", group_size=32)), tmp_path / "q")
    _refused([str(tmp_path / "q"), "--out", str(tmp_path / "m.gguf")], tmp_path, "GGUF export does not know the 'switch_transformers' family")


def test_an_output_inside_the_checkpoint_and_a_wrong_suffix_are_refused(default_q4: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in default_q4.iterdir())
    _refused([str(default_q4), "--out", str(default_q4 / "m.gguf")], tmp_path, "lies inside the input")
    _refused([str(default_q4), "--out", str(tmp_path / "m.bin")], tmp_path, "a GGUF file's name ends in .gguf")
    _refused([str(default_q4), "--out", str(tmp_path / "m.gguf"), "--format", "onnx"], tmp_path, "--format 'onnx' is not supported")
    assert sorted(p.name for p in default_q4.iterdir()) == before


def test_a_failure_while_writing_leaves_nothing(default_q4: Path, tmp_path: Path, monkeypatch) -> None:
    import moeq.export.gguf as module

    def broken(tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "ggml_blocks", broken)
    with pytest.raises(Exception, match="No space left|disk"):
        export_gguf(default_q4, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def default_k(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "k"
    source = load_source(DEFAULT_MODEL)
    moeq.save(moeq.quantize(source, k_plan(source, "q5_k")), out, source=DEFAULT_MODEL)
    return out


def test_k_quant_experts_are_copied_byte_for_byte(default_k: Path, tmp_path: Path) -> None:
    report = export_gguf(default_k, tmp_path / "m.gguf")
    model = moeq.load(default_k)
    tensors = _reader_tensors(report.path)
    experts = model.get_submodule("model.layers.3.mlp.experts")
    stored = tensors["blk.3.ffn_up_exps.weight"]
    assert stored.tensor_type == gguf.GGMLQuantizationType.Q5_K
    ours = np.stack([experts.expert(e)["up_proj"].codes.numpy().reshape(384, -1) for e in range(8)])
    assert np.array_equal(stored.data, ours)
    assert np.array_equal(gguf.quants.dequantize(stored.data, stored.tensor_type),
                          np.stack([experts.expert(e)["up_proj"].weight_for(torch.float32).numpy() for e in range(8)]))
    # bytes as the formats define them: gate/up 5.5 bits per weight, down (Q4_0) 4.5
    assert report.expert_bits_per_weight == pytest.approx((2 * 5.5 + 4.5) / 3)


def test_k_quant_checkpoints_run_in_moeq_on_the_cpu_backend(default_k: Path) -> None:
    from moeq.modules.experts import use_backend

    model = moeq.load(default_k)
    for parameter in model.parameters():
        parameter.data = parameter.data.float()
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        cpu = model(ids).logits
        use_backend(model, "reference")
        reference = model(ids).logits
    # float32; the same decoded weights, summed in a different order (the kernels' own tolerance)
    torch.testing.assert_close(cpu, reference, atol=1e-4, rtol=0)


def test_a_k_quant_block_with_a_broken_scale_is_refused(default_k: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(default_k, folder)
    shard = next(p for p in sorted(folder.glob("*.safetensors")) if "model.layers.0.mlp.experts.0.up_proj.codes" in load_file(p))
    tensors = load_file(shard)
    codes = tensors["model.layers.0.mlp.experts.0.up_proj.codes"].clone()
    codes[0:2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # Q5_K's d (first two bytes) = float16 NaN
    tensors["model.layers.0.mlp.experts.0.up_proj.codes"] = codes
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(Exception, match="non-finite super-block scales"):
        moeq.load(folder)


def _worst_against_llama_cpp(checkpoint: Path, path: Path, prompts: int = 8) -> float:
    """The largest gap between llama.cpp's top-10 next-token log-probs for the GGUF file and moeq's
    for its checkpoint, over ``prompts`` random 12-token prompts (at least 5 compared; the logits
    peaked enough that a wrong tensor would show)."""
    ids = [torch.randint(1, 320, (12,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(prompts)]
    ours = _moeq_logprobs(checkpoint, ids)
    compared = [(i, top) for i, top in enumerate(_llama_cpp_logprobs(path, ids)) if top]  # a half UTF-8 character is withheld
    assert len(compared) >= 5 and float(ours.std()) > 1.0
    return max(abs(ours[i, t].item() - lp) for i, top in compared for t, lp in top.items())


def _saved(model, folder: Path, quant=None) -> Path:
    """``model`` saved with a byte-level BPE tokenizer of 320 tokens and quantized (Q8_0 experts by default)."""
    from tests.conftest import add_tokenizer

    model.save_pretrained(folder / "source")
    add_tokenizer(folder / "source", vocab_size=320)
    moeq.save(moeq.quantize(model, quant or moeq.QuantConfig(bits=8, scheme="sym", group_size=32)), folder / "q", source=folder / "source")
    return folder / "q"


def _tiny_moe(family: str, folder: Path, config_change=None, quant=None) -> Path:
    """A tiny Qwen-MoE, OLMoE or DeepSeek-V3 with peaked logits (weights at 10x the usual scale) and
    widths GGUF's 32-blocks divide, saved with a byte-level BPE tokenizer, experts as Q8_0."""
    from moeq.models import auto_model_class
    from moeq.models.tiny import tiny_config

    config = tiny_config(family)
    config.vocab_size, config.initializer_range = 320, 0.2
    config.moe_intermediate_size = 32 if family == "deepseek_v3" else 64
    if config_change:
        config_change(config)
    if family == "deepseek_v3":
        pass  # 2 groups of 4 experts, 1 group chosen, a shared expert, a dense first layer, q/kv ranks 32
    elif family == "qwen2_moe":
        config.shared_expert_intermediate_size = 64
    elif family == "qwen3_moe":
        config.norm_topk_prob = True  # what llama.cpp's qwen3moe graph does
    else:  # olmoe: its experts are intermediate_size wide; llama.cpp normalises k over the full width
        config.intermediate_size, config.num_key_value_heads = 64, config.num_attention_heads
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    if family == "deepseek_v3":  # a router bias that changes which experts are chosen
        for layer in model.model.layers[config.first_k_dense_replace:]:
            layer.mlp.gate.e_score_correction_bias.data = torch.randn(config.n_routed_experts) * 0.5
    return _saved(model, folder, quant)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_qwen_moe_and_olmoe_exports_run_in_llama_cpp_and_read_back_in_transformers(family: str, tmp_path: Path) -> None:
    import transformers

    checkpoint = _tiny_moe(family, tmp_path)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == family.replace("_", "")
    names = {t.name for t in reader.tensors}
    assert ("blk.1.attn_q.bias" if family == "qwen2_moe" else "blk.1.attn_q_norm.weight") in names
    if family == "qwen2_moe":
        assert {"blk.0.ffn_gate_inp_shexp.weight", "blk.0.ffn_up_shexp.weight"} <= names

    prompts = [torch.randint(1, 320, (12,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(8)]
    ours = _moeq_logprobs(checkpoint, prompts)
    theirs = _llama_cpp_logprobs(path, prompts)
    compared = [(i, top) for i, top in enumerate(theirs) if top]  # llama-server withholds a token that is half a UTF-8 character
    assert len(compared) >= 5
    # Q8_0 experts, F32 elsewhere: llama.cpp rounds activations to 8-bit blocks (measured worst 0.035)
    assert max(abs(ours[i, t].item() - lp) for i, top in compared for t, lp in top.items()) <= 0.1
    assert float(ours.std()) > 1.0  # peaked enough that a wrong tensor would show

    if family == "olmoe":
        return  # transformers reads no OLMoE GGUF
    # transformers' own GGUF reader (dequantizing through the gguf package). Its metadata mapping for
    # these families does not read expert_feed_forward_length, so it is given the checkpoint's config.
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", config=config, dtype=torch.float32).eval()
    reference = moeq.load(checkpoint)
    for parameter in reference.parameters():
        parameter.data = parameter.data.float()
    ids = torch.tensor(prompts[:2])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)  # measured 3e-6


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_deepseek_v3_export_runs_in_llama_cpp(rope: str, tmp_path: Path) -> None:
    def with_rope(config):
        if rope == "yarn":  # DeepSeek-V3's own scaling (its factor 40 over 4096 positions, here 4 over 16)
            config.rope_parameters = dict(YARN)

    checkpoint = _tiny_moe("deepseek_v3", tmp_path, with_rope)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deepseek2"
    tensors = {t.name: t for t in reader.tensors}
    assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_shexp.weight", "blk.1.exp_probs_b.bias",
            "blk.1.attn_q_a.weight", "blk.1.attn_kv_a_mqa.weight"} <= set(tensors)
    # multi-head latent attention as llama.cpp absorbs it: kv_b_proj split into k_b (transposed per head) and v_b
    reference = moeq.load(checkpoint)
    kv_b = reference.model.layers[1].self_attn.kv_b_proj.weight.detach().float().reshape(4, 8 + 16, 32)
    k_b = torch.from_numpy(np.array(tensors["blk.1.attn_k_b.weight"].data)).reshape(4, 32, 8)
    v_b = torch.from_numpy(np.array(tensors["blk.1.attn_v_b.weight"].data)).reshape(4, 16, 32)
    assert torch.equal(k_b, kv_b[:, :8].transpose(1, 2)) and torch.equal(v_b, kv_b[:, 8:])
    assert "blk.1.attn_kv_b.weight" not in tensors

    # Q8_0 experts, F32 elsewhere (measured worst 0.048 default, 0.038 YaRN; without the router's
    # score-correction bias 4.8, without group-limited routing 2.0: both reach llama.cpp's graph)
    assert _worst_against_llama_cpp(checkpoint, path) <= 0.1


def test_deepseek_v3_refusals_name_llama_cpps_rule(tmp_path: Path) -> None:
    def without_q_lora(config):
        config.q_lora_rank = None

    checkpoint = _tiny_moe("deepseek_v3", tmp_path / "a", without_q_lora)
    _refused([str(checkpoint), "--out", str(tmp_path / "m.gguf")], tmp_path,
             "llama.cpp's deepseek2 reads q_a/q_b (q_lora_rank) at every layer count but 26 and 27, where it reads q_proj alone, "
             "but this model's config has q_lora_rank = None")
    checkpoint = _tiny_moe("deepseek_v3", tmp_path / "b", quant=moeq.QuantConfig(bits=8, scheme="sym", group_size=32, attn_bits=8))
    _refused([str(checkpoint), "--out", str(tmp_path / "m.gguf")], tmp_path,
             "model.layers.0.self_attn.kv_b_proj.weight is quantized, but llama.cpp's deepseek2 holds it split and transposed")


def test_a_config_llama_cpp_computes_differently_is_refused(tmp_path: Path) -> None:
    checkpoint = _tiny_moe("qwen3_moe", tmp_path)
    config = json.loads((checkpoint / "config.json").read_text())
    config["norm_topk_prob"] = False
    (checkpoint / "config.json").write_text(json.dumps(config))
    _refused([str(checkpoint), "--out", str(tmp_path / "m.gguf")], tmp_path,
             "llama.cpp's qwen3moe renormalises the top-k routing weights, but this model's config has norm_topk_prob = False")


def test_an_olmoe_with_fewer_key_value_heads_is_refused(tmp_path: Path) -> None:
    from moeq.models.tiny import tiny_model

    model = tiny_model("olmoe")  # 2 key/value heads for 4 query heads
    checkpoint = tmp_path / "q"
    moeq.save(moeq.quantize(model, moeq.QuantConfig(bits=8, scheme="sym", group_size=16)), checkpoint)
    _refused([str(checkpoint), "--out", str(tmp_path / "m.gguf")], tmp_path,
             "llama.cpp's olmoe normalises k over the model's full width (as many key/value heads as query heads), but this "
             "model's config has num_key_value_heads = 2")


def _tiny_gpt_oss(folder: Path, rope: str = "default", quant=None) -> Path:
    """A tiny gpt-oss (sliding window 6 over 12-token prompts, random expert and router biases,
    weights at 10x the usual scale so the SwiGLU clamps act), saved with a byte-level BPE tokenizer."""
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config("gpt_oss")
    config.vocab_size, config.initializer_range, config.intermediate_size, config.sliding_window = 320, 0.2, 64, 6
    config.rope_parameters = {"rope_type": "default", "rope_theta": 150000.0}
    if rope.startswith("yarn"):  # gpt-oss's own (factor 32 over 4096 positions; here over 4)
        config.rope_parameters.update(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4,
                                      truncate=rope != "yarn")
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("_bias", "router.bias", "sinks")):
                parameter.copy_(torch.randn(parameter.shape, generator=gen))
    return _saved(model, folder, quant)


@pytest.mark.parametrize("rope", ["default", "yarn-truncated", "yarn"])
def test_gpt_oss_export_runs_in_llama_cpp(rope: str, tmp_path: Path) -> None:
    checkpoint = _tiny_gpt_oss(tmp_path, rope)
    report = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32")
    path = report.path
    if rope == "yarn":  # gpt-oss's own truncate = false, which llama.cpp does not follow: compared as it computes it
        assert "truncate = false" in report.note
        config = json.loads((checkpoint / "config.json").read_text())
        config["rope_parameters"]["truncate"] = True
        (checkpoint / "config.json").write_text(json.dumps(config))
    else:
        assert report.note is None
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "gpt-oss"
    tensors = {t.name: t for t in reader.tensors}
    assert {"blk.1.attn_sinks.weight", "blk.1.ffn_gate_inp.bias", "blk.1.attn_q.bias", "blk.1.post_attention_norm.weight"} <= set(tensors)
    experts = moeq.load(checkpoint).model.layers[1].mlp.experts
    bias = np.array(tensors["blk.1.ffn_up_exps.bias"].data).reshape(4, 64)
    assert np.array_equal(bias[2], experts.expert(2)["up_proj"].bias.detach().float().numpy())

    # Q8_0 experts, F32 elsewhere (measured worst 0.061 default, 0.042 YaRN; the file against
    # transformers' YaRN with truncate = false: 2.98, the rounding llama.cpp's note names; with the
    # sliding window written as 64: 8.0, so the window reaches llama.cpp's graph)
    assert _worst_against_llama_cpp(checkpoint, path) <= 0.1


@pytest.mark.parametrize("variant", ["glm-4.5-air", "glm-4.5"])
def test_glm4_moe_export_runs_in_llama_cpp(variant: str, tmp_path: Path) -> None:
    """GLM-4.5 (q/k norms, the 355B's) and GLM-4.5-Air (without): partial rotary, attention biases,
    a dense first layer, a shared expert, sigmoid routing with a score-correction bias and scale."""
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config("glm4_moe")
    config.vocab_size, config.initializer_range, config.moe_intermediate_size = 320, 0.2, 64
    config.attention_bias, config.use_qk_norm, config.routed_scaling_factor = True, variant == "glm-4.5", 2.5
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("e_score_correction_bias", "_proj.bias")):  # a router bias that changes which experts are chosen
                parameter.copy_(torch.randn(parameter.shape, generator=gen))
    checkpoint = _saved(model, tmp_path)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "glm4moe"
    names = {t.name for t in reader.tensors}
    assert {"blk.0.ffn_gate.weight", "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_shexp.weight", "blk.1.exp_probs_b.bias",
            "blk.1.attn_q.bias", "blk.1.post_attention_norm.weight"} <= names
    assert ("blk.1.attn_q_norm.weight" in names) == (variant == "glm-4.5")
    # Q8_0 experts, F32 elsewhere (measured worst 0.044 Air, 0.036 with q/k norms; the file written
    # with the routed scale 1.0 instead of 2.5: 1.5, without top-k renormalisation 1.0, rotating the
    # whole head instead of half of it 6.5: each reaches llama.cpp's graph)
    assert _worst_against_llama_cpp(checkpoint, path, prompts=16) <= 0.1


def test_dots1_export_runs_in_llama_cpp(tmp_path: Path) -> None:
    """dots.llm1: Qwen3's attention with DeepSeek-V3's sigmoid routing (score-correction bias,
    renormalised top-k, routed scale), a shared expert and a dense first layer."""
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config("dots1")
    config.vocab_size, config.initializer_range, config.moe_intermediate_size = 320, 0.2, 64
    config.first_k_dense_replace, config.norm_topk_prob, config.routed_scaling_factor = 1, True, 2.5
    config.num_key_value_heads = config.num_attention_heads  # llama.cpp's dots1 holds no grouped keys (dots.llm1 has none)
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)))
    checkpoint = _saved(model, tmp_path)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "dots1"
    assert {"blk.0.ffn_gate.weight", "blk.1.exp_probs_b.bias", "blk.1.ffn_down_shexp.weight", "blk.1.attn_k_norm.weight"} <= {
        t.name for t in reader.tensors}
    # Q8_0 experts, F32 elsewhere (measured worst 0.039; the file written with softmax gating 1.4,
    # with the routed scale 1.0 instead of 2.5: 2.0)
    assert _worst_against_llama_cpp(checkpoint, path, prompts=16) <= 0.1


def test_minimax_m2_export_runs_in_llama_cpp(tmp_path: Path) -> None:
    """MiniMax-M2: q/k norms over all heads, half of each head rotated, sigmoid routing with the
    block's score-correction bias."""
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config("minimax_m2")
    config.vocab_size, config.initializer_range, config.intermediate_size = 320, 0.2, 64
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.5}
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.e_score_correction_bias.copy_(torch.randn(4, generator=torch.Generator().manual_seed(1)))
    checkpoint = _saved(model, tmp_path)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "minimax-m2"
    assert {"blk.1.exp_probs_b.bias", "blk.1.attn_q_norm.weight"} <= {t.name for t in reader.tensors}
    # Q8_0 experts, F32 elsewhere (measured worst 0.056; the file written with softmax gating 1.9,
    # rotating whole heads 5.7)
    assert _worst_against_llama_cpp(checkpoint, path, prompts=16) <= 0.1


def test_deepseek_v2_export_runs_in_llama_cpp(tmp_path: Path) -> None:
    """DeepSeek-V2 as llama.cpp's deepseek2: V3's attention, softmax routing scaled, not renormalised."""
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config("deepseek_v2")
    config.vocab_size, config.initializer_range, config.moe_intermediate_size = 320, 0.2, 32
    config.first_k_dense_replace, config.routed_scaling_factor = 1, 2.0
    torch.manual_seed(0)
    checkpoint = _saved(auto_model_class(config).from_config(config).eval(), tmp_path)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "deepseek2"
    assert reader.fields["deepseek2.expert_gating_func"].contents() == 1
    # Q8_0 experts, F32 elsewhere (measured worst 0.035; the file written with sigmoid gating 1.7,
    # renormalising the top-k 0.33, with the routed scale 1.0 instead of 2.0: 1.3)
    assert _worst_against_llama_cpp(checkpoint, path, prompts=16) <= 0.1


@pytest.mark.parametrize(("model_type", "arch"), [("glm4_moe_lite", "deepseek2"), ("solar_open", "glm4moe")])
def test_families_llama_cpp_runs_as_another_architecture(model_type: str, arch: str, tmp_path: Path) -> None:
    """GLM-4.7-Flash as DeepSeek-V3's deepseek2, Solar Open as GLM-4.5's glm4moe (llama.cpp's own mapping)."""
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config(model_type)
    config.vocab_size, config.initializer_range, config.moe_intermediate_size = 320, 0.2, 32
    torch.manual_seed(0)
    model = auto_model_class(config).from_config(config).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a router bias that changes which experts are chosen
                buffer.copy_(torch.randn(buffer.shape, generator=torch.Generator().manual_seed(1)))
    checkpoint = _saved(model, tmp_path)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == arch
    assert _worst_against_llama_cpp(checkpoint, path, prompts=16) <= 0.1  # measured 0.023 and 0.064


@pytest.mark.parametrize("rope", ["default", "ntk-alpha"])
def test_hunyuan_moe_export_runs_in_llama_cpp(rope: str, tmp_path: Path) -> None:
    """HunYuan-MoE: q/k norms after the rotation, a shared MLP, softmax routing renormalised; its
    fixed-alpha NTK rotary (Hunyuan-A13B's) written as the stretched base transformers computes."""
    from moeq.models import auto_model_class
    from tests.models.families import tiny_config

    config = tiny_config("hunyuan_v1_moe")
    config.vocab_size, config.initializer_range, config.intermediate_size = 320, 0.2, 64
    if rope == "ntk-alpha":
        config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0}
    torch.manual_seed(0)
    checkpoint = _saved(auto_model_class(config).from_config(config).eval(), tmp_path)
    path = export_gguf(checkpoint, tmp_path / "m.gguf", float_type="F32").path
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "hunyuan-moe"
    # Q8_0 experts, F32 elsewhere (measured worst 0.048 default, 0.044 NTK-alpha; the base written
    # unstretched: 3.2)
    assert _worst_against_llama_cpp(checkpoint, path, prompts=16) <= 0.1
