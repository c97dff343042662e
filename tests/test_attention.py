"""Tests for qwen3_scratch.attention: shapes, parity with transformers' Qwen3Attention, eager == SDPA,
recorded attention maps, GQA without copies, KV-cache decoding, and errors on bad head counts."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qwen3_scratch.attention import Qwen3Attention, attention_eager, causal_mask
from qwen3_scratch.kv_cache import KVCache
from qwen3_scratch.rope import RotaryEmbedding

D, H, K, DH = 64, 4, 2, 16  # tiny, with H * Dh = 64 == D; shape tests also use H * Dh != D


def rope_tables(B, T, head_dim=DH, start=0):
    pos = torch.arange(start, start + T).expand(B, T)
    return RotaryEmbedding(head_dim, 1e6)(pos)  # (B, T, Dh) each


def additive(mask_bool):
    """Our bool mask (True = may attend) -> transformers' additive float mask."""
    return torch.zeros(mask_bool.shape).masked_fill(~mask_bool, torch.finfo(torch.float32).min)


def padded_mask(B, T, pads):
    """Causal mask with row 1 left-padded by `pads` tokens; pad queries attend only to themselves."""
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, :pads] = False
    return ((causal_mask(T) & keep[:, None, :]) | torch.eye(T, dtype=torch.bool))[:, None]  # (B, 1, T, T)


@pytest.fixture(scope="module")
def pair():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention as HFAttention
    cfg = Qwen3Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=K, head_dim=DH,
                      rms_norm_eps=1e-6, rope_theta=1e6, attn_implementation="eager")
    torch.manual_seed(0)
    ref = HFAttention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():  # norms included: the default init leaves their gains at 1
            p.normal_(0, 0.1)
    ours = Qwen3Attention(D, H, K, DH, rms_norm_eps=1e-6).eval()
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    return ref, ours


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("record", [False, True], ids=["sdpa", "eager"])
def test_shapes(num_kv_heads, record):
    torch.manual_seed(0)
    layer = Qwen3Attention(48, 4, num_kv_heads, head_dim=16).eval()  # H * Dh = 64 != D = 48, as in Qwen3
    layer.record_probs = record
    assert layer.q_proj.weight.shape == (64, 48) and layer.k_proj.weight.shape == (num_kv_heads * 16, 48)
    assert layer.o_proj.weight.shape == (48, 64) and layer.q_norm.weight.shape == (16,)
    cos, sin = rope_tables(3, 5)
    with torch.no_grad():
        out = layer(torch.randn(3, 5, 48), cos, sin)
    assert out.shape == (3, 5, 48)
    assert (layer.last_probs is not None) == record
    if record:
        assert layer.last_probs.shape == (3, 4, 5, 5)


def test_no_biases_and_checkpoint_names():
    layer = Qwen3Attention(D, H, K, DH)
    assert sorted(layer.state_dict()) == ["k_norm.weight", "k_proj.weight", "o_proj.weight", "q_norm.weight",
                                          "q_proj.weight", "v_proj.weight"]


@pytest.mark.parametrize("T", [1, 2, 7, 16])
@pytest.mark.parametrize("padding", [False, True], ids=["causal", "left-padded"])
@pytest.mark.parametrize("record", [False, True], ids=["sdpa", "eager"])
def test_matches_transformers(pair, T, padding, record):
    ref, ours = pair
    torch.manual_seed(T)
    B = 2
    x = torch.randn(B, T, D)
    cos, sin = rope_tables(B, T)
    mask = padded_mask(B, T, min(3, T - 1)) if padding else None
    ref_mask = causal_mask(T)[None, None] if mask is None else mask
    ours.record_probs = record
    try:
        with torch.no_grad():
            want, want_w = ref(x, (cos, sin), additive(ref_mask))
            got = ours(x, cos, sin, mask)
    finally:
        ours.record_probs = False
    assert (got - want).abs().max().item() <= 1e-5
    if record:
        assert (ours.last_probs - want_w).abs().max().item() <= 1e-6


def test_rope_tables_match_transformers():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    cfg = Qwen3Config(hidden_size=D, num_attention_heads=H, num_key_value_heads=K, head_dim=DH, rope_theta=1e6)
    pos = torch.arange(40).expand(2, 40)
    cos, sin = RotaryEmbedding(DH, 1e6)(pos)
    ref_cos, ref_sin = Qwen3RotaryEmbedding(cfg)(torch.zeros(1), pos)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def _qkv(B, H_, K_, T, S, Dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H_, T, Dh, generator=g), torch.randn(B, K_, S, Dh, generator=g),
            torch.randn(B, K_, S, Dh, generator=g))


@pytest.mark.parametrize("num_kv_heads", [8, 4, 2, 1])
def test_eager_equals_sdpa(num_kv_heads):
    B, T = 2, 6
    q, k, v = _qkv(B, 8, num_kv_heads, T, T)
    eager, _ = attention_eager(q, k, v)
    assert torch.allclose(eager, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), atol=1e-6)
    mask = padded_mask(B, T, 2)
    eager_m, _ = attention_eager(q, k, v, mask)
    assert torch.allclose(eager_m, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), atol=1e-6)
    # queries that are the last 3 of 10 positions (keys from a cache): the triangle shifts right by S - T
    q3, k10, v10 = _qkv(B, 8, num_kv_heads, 3, 10, seed=1)
    shifted, _ = attention_eager(q3, k10, v10)
    assert torch.allclose(shifted, F.scaled_dot_product_attention(q3, k10, v10, attn_mask=causal_mask(3, 10),
                                                                  enable_gqa=True), atol=1e-6)


def test_layer_sdpa_equals_eager_with_cache_like_offsets():
    """The layer's SDPA path must shift the causal triangle when T < S, like the eager path."""
    torch.manual_seed(0)
    layer = Qwen3Attention(D, H, K, DH).eval()
    x = torch.randn(2, 9, D)
    cos, sin = rope_tables(2, 9)
    outs = {}
    for record in (False, True):
        layer.record_probs = record
        cache = KVCache(1, 2, 16, K, DH)
        with torch.no_grad():
            first = layer(x[:, :5], cos[:, :5], sin[:, :5], kv_cache=cache)
            cache.advance(5)
            second = layer(x[:, 5:], cos[:, 5:], sin[:, 5:], kv_cache=cache)  # T = 4 queries, S = 9 keys
        outs[record] = torch.cat([first, second], dim=1)
    with torch.no_grad():
        layer.record_probs = False
        full = layer(x, cos, sin)
    assert torch.allclose(outs[False], outs[True], atol=1e-6)
    assert torch.allclose(outs[False], full, atol=1e-5), "chunked prefill with a cache must equal one full pass"


def test_cached_decoding_equals_full_pass():
    torch.manual_seed(0)
    layer = Qwen3Attention(D, H, K, DH).eval()
    B, T = 2, 8
    x = torch.randn(B, T, D)
    cos, sin = rope_tables(B, T)
    cache = KVCache(1, B, T, K, DH)
    with torch.no_grad():
        full = layer(x, cos, sin)
        steps = [layer(x[:, :3], cos[:, :3], sin[:, :3], kv_cache=cache)]
        cache.advance(3)
        for t in range(3, T):
            steps.append(layer(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], kv_cache=cache))
            cache.advance(1)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_record_probs_rows_sum_to_one_and_are_causal():
    torch.manual_seed(0)
    layer = Qwen3Attention(D, H, K, DH).eval()
    layer.record_probs = True
    cos, sin = rope_tables(2, 10)
    with torch.no_grad():
        layer(torch.randn(2, 10, D), cos, sin)
    w = layer.last_probs
    assert w.shape == (2, H, 10, 10)
    assert torch.allclose(w.sum(-1), torch.ones(2, H, 10), atol=1e-6)
    assert torch.all(w.triu(1) == 0), "weights above the diagonal (future tokens) must be exactly zero"
    assert torch.all(w[..., 0, 0] == 1), "the first token can only attend to itself"
    assert not w.requires_grad


@pytest.mark.parametrize("num_kv_heads", [8, 4, 2, 1])
def test_gqa_equals_repeat_interleave_reference(num_kv_heads):
    B, T = 2, 7
    q, k, v = _qkv(B, 8, num_kv_heads, T, T, seed=3)
    G = 8 // num_kv_heads
    kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # (B, H, S, Dh)
    scores = (q @ kr.transpose(-1, -2) / math.sqrt(16)).masked_fill(~causal_mask(T), float("-inf"))
    want_p = scores.softmax(-1)
    got, got_p = attention_eager(q, k, v)
    assert torch.allclose(got, want_p @ vr, atol=1e-6)
    assert torch.allclose(got_p, want_p, atol=1e-6)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_decoding_step_does_not_copy_keys_or_values():
    cache_k, cache_v = torch.randn(2, 1, 2, 64, 16).unbind(0)  # (B, K, max_len, Dh) buffers
    k, v = cache_k[:, :, :40], cache_v[:, :, :40]  # (B, K, S, Dh) views, as a cache returns them
    q = torch.randn(1, 1, 8, 16).transpose(1, 2)  # (B, H, 1, Dh), laid out as the layer makes it
    with _OpLog() as log:
        attention_eager(q, k, v)
    assert "clone" not in log.ops and "repeat_interleave" not in log.ops, log.ops


def test_causal_mask():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    with pytest.raises(ValueError, match="S=2"):
        causal_mask(3, 2)


@pytest.mark.parametrize("heads, kv_heads", [(6, 4), (4, 0), (0, 2), (4, 8)])
def test_bad_head_counts_raise(heads, kv_heads):
    with pytest.raises(ValueError, match=rf"num_attention_heads \({heads}\).*num_key_value_heads \({kv_heads}\)"):
        Qwen3Attention(64, heads, kv_heads, 16)


def test_attention_eager_rejects_bad_inputs():
    q, k, v = _qkv(1, 6, 4, 3, 3)
    with pytest.raises(ValueError, match="6 query heads.*4 kv heads"):
        attention_eager(q, k, v)
    q, k, v = _qkv(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="bool mask"):
        attention_eager(q, k, v, torch.zeros(3, 3))  # an additive float mask is not our convention
    with pytest.raises(ValueError, match=r"\(1, 3, 3\)"):
        attention_eager(q, k, v, causal_mask(3)[None])  # (B, T, S) is ambiguous: refuse it
