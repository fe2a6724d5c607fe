"""The CPU backend matches the torch reference."""

import pytest
import torch

from moeq.kernels import moe_experts_forward
from tests.kernels.helpers import quantized_experts, routing

ATOL = 1e-5  # float32; same products, summed in a different order


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_backend_matches_reference_on_mixed_widths(family: str, seed: int) -> None:
    experts = quantized_experts(family, seed=seed)
    hidden = experts.expert(0)[experts.projections[0]].in_features
    x, index, weights = routing(9, hidden, experts.num_experts, 2 if experts.gated else 1, seed)
    expected = moe_experts_forward(x, index, weights, experts, backend="reference")
    got = moe_experts_forward(x, index, weights, experts, backend="cpu")
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_auto_runs_cpu_on_cpu_tensors_and_unknown_backend_is_refused() -> None:
    experts = quantized_experts("mixtral")
    x, index, weights = routing(3, 64, experts.num_experts, 2)
    torch.testing.assert_close(experts(x, index, weights), moe_experts_forward(x, index, weights, experts, "cpu"), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown experts backend 'cuda'"):
        moe_experts_forward(x, index, weights, experts, "cuda")
