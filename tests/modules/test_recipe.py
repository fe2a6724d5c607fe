"""The pure per-layer step: a LayerJob in, packed weights out, whatever runs it."""

from __future__ import annotations

import pickle

import pytest
import torch

from moeq.modules.recipe import GPTQOptions, LayerJob, WeightJob, quantize_layer, quantize_weight
from moeq.plan import TensorSpec
from moeq.quant.schemes import Scheme


def _weight(seed: int, rows: int = 24, cols: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 4, generator=gen) @ torch.randn(4, cols, generator=gen) + 0.1 * torch.randn(200, cols, generator=gen)
    return torch.randn(rows, cols, generator=gen), x.T @ x


def _same(a, b) -> bool:
    fields = ("codes", "scales", "zeros")
    return all((getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f)) for f in fields)


def _job() -> LayerJob:
    three, two_g32 = TensorSpec(3), TensorSpec(2, Scheme.ASYM, 32)
    items = []
    for i, (spec, method, with_hessian) in enumerate([
        (three, "gptq", True), (three, "gptq", True), (two_g32, "gptq", True), (three, "gptq-all-tokens", True),
        (three, "rtn", False), (three, "rtn-clip", True), (three, "gptq", False), (three, "gptq-all-tokens", False),
        (TensorSpec(1, Scheme.SIGN, 32), "rtn-clip", False), (TensorSpec(4, Scheme.Q4_K), "gptq", True),
    ]):
        weight, hessian = _weight(i, cols=256 if spec.scheme is Scheme.Q4_K else 64)
        items.append(WeightJob(f"w{i}", weight, spec, method, hessian if with_hessian else None))
    return LayerJob(tuple(items), "float16", GPTQOptions(damp=0.02, act_order=False))


def test_a_layer_job_equals_its_weights_quantized_alone() -> None:
    """GPTQ weights of one spec and shape are solved together; each result is still that weight's
    alone, so how a scheduler splits a layer into jobs never changes the bytes."""
    job = _job()
    together = quantize_layer(job)
    assert len(together) == len(job.weights)
    for item, packed in zip(job.weights, together):
        alone = quantize_weight(item.weight, item.spec, torch.float16, method=item.method, hessian=item.hessian,
                                options=job.options, name=item.name)
        assert _same(alone, packed), item.name
        assert quantize_layer(LayerJob((item,), job.scale_dtype, job.options))[0].codes.equal(packed.codes)


def test_the_recipe_rules() -> None:
    """GPTQ methods without a Hessian round; a rare expert's fallbacks round with the clipping search
    (not for sign codes); GPTQ with a Hessian differs from rounding."""
    job = _job()
    results = quantize_layer(job)
    weight, hessian = job.weights[0].weight, job.weights[0].hessian
    spec = TensorSpec(3)
    plain = quantize_weight(weight, spec, torch.float16, method="rtn")
    clipped = quantize_weight(weight, TensorSpec(3, clip_search=True), torch.float16, method="rtn")
    assert _same(quantize_weight(weight, spec, torch.float16, method="gptq"), plain)
    assert _same(quantize_weight(weight, spec, torch.float16, method="gptq-all-tokens"), clipped)
    assert _same(quantize_weight(weight, spec, torch.float16, method="rtn-clip", hessian=hessian), clipped)
    assert not _same(results[0], plain)
    sign = job.weights[8]
    assert _same(results[8], quantize_weight(sign.weight, sign.spec, torch.float16, method="rtn"))


def test_a_job_is_plain_data() -> None:
    """Jobs cross process boundaries (a pool, Ray): they pickle, and the copy gives the same bytes."""
    job = _job()
    copy = pickle.loads(pickle.dumps(job))
    assert all(_same(a, b) for a, b in zip(quantize_layer(job), quantize_layer(copy)))


def test_unknown_methods_are_refused() -> None:
    weight, _ = _weight(0)
    with pytest.raises(ValueError, match="unknown method 'awq' for w; one of rtn, gptq"):
        WeightJob("w", weight, TensorSpec(3), "awq")
