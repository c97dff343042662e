"""Tests for qwen3_scratch.mlp: shapes, parity with transformers' Qwen3MLP, parameter count, no biases."""
import pytest
import torch
import torch.nn.functional as F

from qwen3_scratch.mlp import SwiGLU
from qwen3_scratch.utils import count_module_params


@pytest.mark.parametrize("shape", [(7, 32), (2, 5, 32), (1, 1, 32)])
def test_shapes(shape):
    torch.manual_seed(0)
    mlp = SwiGLU(32, 80)
    assert mlp(torch.randn(*shape)).shape == shape


def test_formula_and_token_independence():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 48)
    x = torch.randn(2, 6, 16)
    want = (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    y = mlp(x)
    assert torch.allclose(y, want, atol=1e-6)
    x2 = x.clone()
    x2[:, 3:] += 1.0
    assert torch.allclose(mlp(x2)[:, :3], y[:, :3]), "changing later tokens must not change earlier outputs"


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_transformers(seed):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP
    torch.manual_seed(seed)
    ref = Qwen3MLP(Qwen3Config(hidden_size=64, intermediate_size=192, hidden_act="silu")).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ours = SwiGLU(64, 192).eval()
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    x = torch.randn(3, 9, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_parameter_count_and_no_biases():
    mlp = SwiGLU(24, 72)
    assert count_module_params(mlp) == 3 * 24 * 72
    assert [n for n, _ in mlp.named_parameters()] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert mlp.gate_proj.weight.shape == (72, 24) and mlp.down_proj.weight.shape == (24, 72)


def test_qwen3_0_6b_feed_forward_size():
    with torch.device("meta"):  # shapes only
        mlp = SwiGLU(1024, 3072)
    assert count_module_params(mlp) == 9_437_184
    assert 28 * count_module_params(mlp) == 264_241_152
