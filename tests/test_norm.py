"""RMSNorm: shapes, equality with torch.nn.RMSNorm and transformers' Qwen3RMSNorm (fp32 and bf16), eps, cast order."""
import pytest
import torch

from qwen3_scratch.norm import RMSNorm

D = 64


def trio(dim=D, eps=1e-6, seed=0):
    """Ours, torch.nn.RMSNorm and Qwen3RMSNorm, sharing one random weight."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    torch.manual_seed(seed)
    mods = RMSNorm(dim, eps), torch.nn.RMSNorm(dim, eps=eps), Qwen3RMSNorm(dim, eps=eps)
    w = torch.randn(dim)
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(w)
    return mods


def inputs(seed=1):
    torch.manual_seed(seed)
    return torch.randn(3, 7, D) * 4 + 1.5  # (B, T, D), offset so that mean subtraction would matter


def test_init_shapes_and_unit_rms():
    norm = RMSNorm(D)
    assert norm.eps == 1e-6, "Qwen3's default eps is 1e-6"
    assert [n for n, _ in norm.named_parameters()] == ["weight"], "one weight, no bias"
    assert torch.equal(norm.weight, torch.ones(D))
    for shape in [(D,), (5, D), (2, 5, D), (2, 4, 5, D)]:  # any leading shape, e.g. (B, H, T, Dh) for QK-norm
        x = torch.randn(shape) * 10
        with torch.no_grad():
            y = norm(x)
        assert y.shape == x.shape
        assert torch.allclose(y.pow(2).mean(-1), torch.ones(shape[:-1]), atol=1e-5)
    assert "64, eps=1e-06" in repr(norm)


def test_no_mean_subtraction_and_scale_invariance():
    norm = RMSNorm(4)
    x = torch.tensor([1.0, -2.0, 3.0, 6.0])
    with torch.no_grad():
        expected = x / torch.sqrt(torch.tensor(12.5 + 1e-6))
        assert torch.allclose(norm(x), expected, atol=1e-7)
        assert torch.allclose(norm(100 * x), norm(x), atol=1e-6)
        assert (norm(x + 10) > 0).all(), "an offset must survive (LayerNorm would remove it)"


def test_weight_scales_each_channel():
    norm = RMSNorm(D)
    x = inputs()
    with torch.no_grad():
        base = norm(x)
        norm.weight.copy_(torch.arange(D, dtype=torch.float32))
        assert torch.allclose(norm(x), base * torch.arange(D), atol=1e-5)


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-2])
def test_equals_references_fp32(eps):
    ours, ref_torch, ref_hf = trio(eps=eps)
    x = inputs()
    with torch.no_grad():
        y = ours(x)
        assert torch.equal(y, ref_hf(x)), "fp32 must equal Qwen3RMSNorm exactly"
        assert (y - ref_torch(x)).abs().max() <= 1e-6
    assert y.dtype == torch.float32


def test_equals_qwen3_rmsnorm_bf16_exactly():
    ours, ref_torch, ref_hf = trio()
    x = inputs().bfloat16()
    with torch.no_grad():
        ours, ref_torch, ref_hf = ours.bfloat16(), ref_torch.bfloat16(), ref_hf.bfloat16()
        y, y_hf, y_torch = ours(x), ref_hf(x), ref_torch(x)
    assert y.dtype == torch.bfloat16, "a bf16 module on bf16 input must give bf16"
    assert torch.equal(y, y_hf), "bf16 must equal Qwen3RMSNorm bit for bit"
    # torch.nn.RMSNorm rounds once after the weight; we round before it: at most one bf16 step apart
    assert torch.allclose(y.float(), y_torch.float(), rtol=2 ** -7, atol=0)


def test_weight_applied_after_the_cast():
    ours, _, _ = trio()
    ours = ours.bfloat16()
    x = inputs().bfloat16()
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, T, D) in fp32
    after_cast = ours.weight * normed.bfloat16()  # Qwen3's order
    before_cast = (ours.weight.float() * normed).bfloat16()  # one rounding at the end
    with torch.no_grad():
        y = ours(x)
    assert torch.equal(y, after_cast)
    assert not torch.equal(y, before_cast), "the two orders must differ somewhere, or this test proves nothing"


def test_computes_in_fp32_for_bf16_and_fp16_input():
    norm = RMSNorm(D)
    x = inputs().bfloat16()
    with torch.no_grad():  # weight = ones: the bf16 result is the fp32 computation on the same input, rounded once
        assert torch.equal(norm.bfloat16()(x), norm.float()(x.float()).bfloat16())
        big = torch.full((D,), 300.0).half()  # 300² overflows float16
        y = norm.half()(big)
    assert y.dtype == torch.float16 and torch.isfinite(y).all() and torch.allclose(y.float(), torch.ones(D))


def test_eps():
    norm = RMSNorm(16)
    with torch.no_grad():
        assert torch.equal(norm(torch.zeros(2, 16)), torch.zeros(2, 16)), "eps must avoid 0/0"
        tiny = torch.full((16,), 1e-3, dtype=torch.float64)  # mean square 1e-6 == eps
        assert torch.allclose(norm.double()(tiny).pow(2).mean().sqrt(), torch.tensor(2 ** -0.5, dtype=torch.float64))
        assert torch.allclose(RMSNorm(16, eps=0.0).double()(tiny), torch.ones(16, dtype=torch.float64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=-1.0)
    with pytest.raises(RuntimeError, match="size of tensor"):  # unchecked in forward (hot path): torch's error
        RMSNorm(8)(torch.randn(2, 3))
