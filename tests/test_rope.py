"""RoPE: tables and rotation equal to transformers' Qwen3 ones, norm preservation, the relative-position property,
interleaved vs split-halves layouts, fp32 frequencies under dtype casts, clear errors."""
import math

import pytest
import torch

from qwen3_scratch.rope import (RotaryEmbedding, apply_rope, apply_rope_interleaved, interleaved_to_halves,
                                rope_inv_freq, rotate_half)

DH = 128
POSITIONS = torch.tensor([[0, 1, 2, 3, 17, 255, 1000, 4095],
                          [8191, 32767, 40000, 40959, 65535, 100000, 123457, 131071]])  # (B, T)


def hf_rotary(theta, head_dim=DH):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    return Qwen3RotaryEmbedding(Qwen3Config(head_dim=head_dim, rope_theta=theta))


def tables(positions, head_dim=DH, theta=1e6):
    return RotaryEmbedding(head_dim, theta)(positions)


def test_inv_freq_formula():
    f = rope_inv_freq(DH, 1e6)
    exact = 1e6 ** (-torch.arange(0, DH, 2, dtype=torch.float64) / DH)
    assert f.shape == (DH // 2,) and f.dtype == torch.float32
    assert f[0] == 1.0 and torch.allclose(f.double(), exact, rtol=1e-6)
    assert (f[1:] < f[:-1]).all(), "frequencies must decrease along the pairs"
    assert torch.allclose(rope_inv_freq(4, 100.0), torch.tensor([1.0, 0.1]))


@pytest.mark.parametrize("theta", [1e6, 1e4])
def test_tables_equal_transformers_exactly(theta):
    ref, ours = hf_rotary(theta), RotaryEmbedding(DH, theta)
    assert torch.equal(ours.inv_freq, ref.inv_freq)
    for dtype in (torch.float32, torch.bfloat16):
        ref_cos, ref_sin = ref(torch.zeros(1, dtype=dtype), POSITIONS)
        cos, sin = ours(POSITIONS, dtype)
        assert cos.shape == sin.shape == (2, 8, DH) and cos.dtype == dtype
        assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin), f"theta={theta}, {dtype}"


def test_tables_layout():
    cos, sin = tables(torch.arange(10)[None])
    assert torch.equal(cos[..., :DH // 2], cos[..., DH // 2:]) and torch.equal(sin[..., :DH // 2], sin[..., DH // 2:])
    assert torch.equal(cos[0, 0], torch.ones(DH)) and torch.equal(sin[0, 0], torch.zeros(DH))
    assert math.isclose(cos[0, 3, 0].item(), math.cos(3.0), abs_tol=1e-6)  # pair 0 turns 1 rad per token
    assert math.isclose(sin[0, 3, 1].item(), math.sin(3 * 1e6 ** (-2 / DH)), abs_tol=1e-6)
    assert tables(torch.arange(5))[0].shape == (5, DH), "1-D positions give (T, Dh)"


def test_frequencies_stay_fp32_through_dtype_casts():
    rot = RotaryEmbedding(DH).to(torch.bfloat16)
    assert rot.inv_freq.dtype == torch.float32 and torch.equal(rot.inv_freq, rope_inv_freq(DH))
    rot.half()
    assert rot.inv_freq.dtype == torch.float32
    assert "inv_freq" not in rot.state_dict(), "not stored in checkpoints"
    cos, _ = rot(POSITIONS, torch.bfloat16)
    assert torch.equal(cos, RotaryEmbedding(DH)(POSITIONS, torch.bfloat16)[0])
    with torch.device("meta"):
        meta = RotaryEmbedding(DH)
    assert meta.to(torch.bfloat16).inv_freq.is_meta, "a meta module stays on meta"


def test_rotate_half():
    x = torch.arange(1.0, 7.0)  # [1..6]
    assert torch.equal(rotate_half(x), torch.tensor([-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]))
    assert torch.equal(rotate_half(rotate_half(x)), -x), "two quarter turns are a half turn"


@pytest.mark.parametrize("theta", [1e6, 1e4])
def test_apply_rope_equals_transformers(theta):
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 8, DH), torch.randn(2, 2, 8, DH)  # (B, H, T, Dh), (B, K, T, Dh)
    cos, sin = tables(POSITIONS, theta=theta)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), q_ref) and torch.equal(apply_rope(k, cos, sin), k_ref)
    cos16, sin16 = RotaryEmbedding(DH, theta)(POSITIONS, torch.bfloat16)
    q_ref16, _ = apply_rotary_pos_emb(q.bfloat16(), k.bfloat16(), cos16, sin16)
    out16 = apply_rope(q.bfloat16(), cos16, sin16)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, q_ref16)


def test_apply_rope_rotates_pairs_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    rot = RotaryEmbedding(4, theta=100.0)  # frequencies 1, 0.1
    cos, sin = rot(torch.tensor([[5]]), torch.float64)
    y = apply_rope(x.view(1, 1, 1, 4), cos, sin).flatten()
    for i, f in enumerate([1.0, 0.1]):  # pair (i, i + 2) rotated by 5 f
        a, b, ang = x[i], x[i + 2], 5 * f
        assert torch.allclose(y[i], a * math.cos(ang) - b * math.sin(ang))
        assert torch.allclose(y[i + 2], b * math.cos(ang) + a * math.sin(ang))


def test_preserves_norms():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, DH) * 5  # (B, H, T, Dh)
    cos, sin = tables(POSITIONS)
    for rope in (apply_rope, apply_rope_interleaved):
        assert torch.allclose(rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


@pytest.mark.parametrize("theta", [1e6, 1e4])
def test_relative_position_property(theta):
    torch.manual_seed(0)
    q, k = torch.randn(DH, dtype=torch.float64), torch.randn(DH, dtype=torch.float64)
    rot = RotaryEmbedding(DH, theta)

    def score(m, n):
        cm, sm = rot(torch.tensor([[m]]), torch.float64)
        cn, sn = rot(torch.tensor([[n]]), torch.float64)
        return (apply_rope(q.view(1, 1, 1, DH), cm, sm) * apply_rope(k.view(1, 1, 1, DH), cn, sn)).sum()

    scale = q.norm() * k.norm()
    for offset in (0, 1, 7, 300):
        ref = score(offset, 0)
        for m in (offset + 1, offset + 50, offset + 12345, 40000):
            assert abs(score(m, m - offset) - ref) < 1e-4 * scale, f"offset {offset}, m {m}"
    assert abs(score(10, 3) - score(10, 4)) > 1e-3 * scale, "different offsets should give different scores"


def test_interleaved_differs_but_is_a_permuted_split_halves():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, DH)  # (B, H, T, Dh)
    cos, sin = tables(POSITIONS)
    halves, inter = apply_rope(x, cos, sin), apply_rope_interleaved(x, cos, sin)
    assert not torch.allclose(halves, inter, atol=1e-2), "the two layouts must give different outputs"
    perm = interleaved_to_halves(DH)
    assert sorted(perm.tolist()) == list(range(DH))
    assert perm[:3].tolist() == [0, 2, 4] and perm[DH // 2:DH // 2 + 3].tolist() == [1, 3, 5]
    inverse = torch.argsort(perm)
    assert torch.allclose(apply_rope(x[..., perm], cos, sin)[..., inverse], inter, atol=1e-6, rtol=0)
    # and the other way round: split halves is interleaved in the inverse-permuted basis
    assert torch.allclose(apply_rope_interleaved(x[..., inverse], cos, sin)[..., perm], halves, atol=1e-6, rtol=0)


def test_interleaved_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # pairs (1, 2) and (3, 4)
    cos, sin = RotaryEmbedding(4, theta=100.0)(torch.tensor([[2]]), torch.float64)
    y = apply_rope_interleaved(x.view(1, 1, 1, 4), cos, sin).flatten()
    for (a, b), (ya, yb), f in [((1.0, 2.0), y[:2], 1.0), ((3.0, 4.0), y[2:], 0.1)]:
        assert torch.allclose(ya, torch.tensor(a * math.cos(2 * f) - b * math.sin(2 * f), dtype=torch.float64))
        assert torch.allclose(yb, torch.tensor(b * math.cos(2 * f) + a * math.sin(2 * f), dtype=torch.float64))


def test_bad_arguments():
    for bad in (7, 127, 0):
        with pytest.raises(ValueError, match="head_dim"):
            RotaryEmbedding(bad)
        with pytest.raises(ValueError, match="head_dim"):
            interleaved_to_halves(bad)
    with pytest.raises(ValueError, match="theta"):
        rope_inv_freq(DH, 1.0)
    cos, sin = tables(POSITIONS)
    with pytest.raises(RuntimeError, match="size of tensor"):  # unchecked (hot path): torch's broadcasting error
        apply_rope(torch.randn(2, 4, 8, 64), cos, sin)
    with pytest.raises(ValueError, match="head_dim 64"):
        apply_rope_interleaved(torch.randn(2, 4, 8, 64), cos, sin)
