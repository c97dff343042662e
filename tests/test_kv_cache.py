"""Tests for qwen3_scratch.kv_cache: cached decoding equals full recomputation (dense and MoE), slots and
positions, and clear errors on overflow and misuse."""
import pytest
import torch

from hf_ref import tiny_hf_model
from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.hf_port import from_transformers
from qwen3_scratch.kv_cache import KVCache
from qwen3_scratch.model import Qwen3Model


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    hf = tiny_hf_model(moe=request.param == "moe")
    return from_transformers(hf)  # strict: every name matches


def ids(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_cached_decode_equals_full_recomputation(model):
    prompt, steps = ids(2, 7), 8
    cache = KVCache.for_model(model, 2, prompt.shape[1] + steps)
    seq, logits = prompt, model(prompt, kv_cache=cache)[:, -1]  # (B, V)
    for step in range(steps):
        full = model(seq)[:, -1]  # (B, V), nothing cached
        diff = (logits - full).abs().max().item()
        assert diff <= 1e-5, f"step {step}: cached vs full logits differ by {diff}"
        nxt = full.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        logits = model(nxt, kv_cache=cache)[:, -1]
    assert cache.pos == prompt.shape[1] + steps == cache.max_len


@torch.no_grad()
def test_cached_decode_with_left_padding_equals_full(model):
    prompt = ids(2, 6, seed=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    cache = KVCache.for_model(model, 2, 10)
    logits = model(prompt, attention_mask=mask, kv_cache=cache)[:, -1]
    seq = prompt
    for step in range(4):
        full = model(seq, attention_mask=mask)[:, -1]
        assert (logits - full).abs().max() <= 1e-5, f"step {step}"
        nxt = full.argmax(-1, keepdim=True)
        seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        logits = model(nxt, attention_mask=mask, kv_cache=cache)[:, -1]


@torch.no_grad()
def test_one_token_at_a_time_fills_the_same_slots_as_one_prefill(model):
    """Keys written at decode time must carry the RoPE rotation of their own position, slot by slot."""
    seq = ids(1, 8, seed=2)
    whole = KVCache.for_model(model, 1, 8)
    model(seq, kv_cache=whole)
    steps = KVCache.for_model(model, 1, 8)
    model(seq[:, :5], kv_cache=steps)  # prefill slots 0..4
    for t in range(5, 8):
        assert steps.pos == t
        model(seq[:, t:t + 1], kv_cache=steps)  # one slot each: 5, 6, 7
    assert whole.pos == steps.pos == 8
    assert torch.allclose(whole.k, steps.k, atol=1e-5) and torch.allclose(whole.v, steps.v, atol=1e-5)
    assert whole.k[:, :, :, 7].abs().sum() > 0, "the last slot was written"


def test_update_writes_at_pos_and_returns_views():
    cache = KVCache(num_layers=2, batch_size=3, max_len=6, num_kv_heads=2, head_dim=4)
    k, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)  # (B, K, T=4, Dh)
    k_all, v_all = cache.update(1, k, v)
    assert k_all.shape == (3, 2, 4, 4) and torch.equal(k_all, k) and torch.equal(v_all, v)
    assert cache.pos == 0, "update does not advance: the model advances once, after its last layer"
    assert cache.k[0].abs().sum() == 0, "layer 0 untouched"
    cache.advance(4)
    k2 = torch.randn(3, 2, 1, 4)
    k_all, _ = cache.update(1, k2, k2)
    assert k_all.shape == (3, 2, 5, 4) and torch.equal(k_all[:, :, 4:], k2) and torch.equal(k_all[:, :, :4], k)
    assert k_all.data_ptr() == cache.k[1].data_ptr(), "a view of the buffer, not a copy"
    cache.advance(1)
    cache.reset()
    assert cache.pos == 0


def test_for_model_shapes_dtype_and_bytes():
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = Qwen3Model(cfg).to(torch.bfloat16)
    cache = KVCache.for_model(model, batch_size=2, max_len=10)
    assert cache.k.shape == cache.v.shape == (3, 2, 2, 10, 8)  # (L, B, K, max_len, Dh)
    assert cache.k.dtype == torch.bfloat16 and cache.nbytes() == 2 * 3 * 2 * 2 * 10 * 8 * 2
    assert "filled=0/10" in repr(cache)
    # Qwen3-0.6B: 112 KiB per token in bf16
    big = KVCache(28, 1, 40_960, 8, 128, torch.bfloat16, device="meta")
    assert big.nbytes() // 40_960 == 114_688


def test_overflow_raises_with_the_limit():
    cache = KVCache(1, 1, 4, 1, 2)
    cache.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    cache.advance(3)
    with pytest.raises(ValueError, match="max_len=4"):
        cache.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="max_len=4"):
        cache.advance(2)


def test_model_forward_past_the_cache_raises():
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = Qwen3Model(cfg).eval()
    cache = KVCache.for_model(model, 1, 5)
    with torch.no_grad():
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="max_len"):
        KVCache(2, 1, 0, 2, 4)
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(2, 1.5, 4, 2, 4)
    cache = KVCache(2, 2, 8, 2, 4)
    with pytest.raises(ValueError, match=r"\(B=2, K=2, T, Dh=4\)"):
        cache.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))  # wrong batch
    with pytest.raises(ValueError, match="got"):
        cache.update(0, torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 2, 4))  # k and v disagree


def test_a_cache_of_the_wrong_shape_is_refused_at_the_first_layer():
    """Shapes are checked once per forward pass (layer 0), before anything is written."""
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8)
    model = Qwen3Model(cfg).eval()
    cache = KVCache.for_model(model, batch_size=2, max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(B=2, K=2, T, Dh=8\), got \(1, 2, 3, 8\)"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    assert cache.pos == 0 and not cache.k.any(), "nothing written"


def test_a_cache_grown_in_blocks_equals_a_preallocated_one(model):
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    whole = KVCache.for_model(model, 2, 12)
    grown = KVCache.for_model(model, 2, 12, block_size=3)
    assert grown.k.shape[3] == 3 and grown.nbytes() == whole.nbytes() * 3 // 12, "one block to start with"
    seq = torch.cat([prompt, torch.randint(0, 64, (2, 7))], dim=1)
    with torch.no_grad():
        a, b = model(prompt, kv_cache=whole), model(prompt, kv_cache=grown)
        for t in range(5, 12):
            a, b = model(seq[:, t:t + 1], kv_cache=whole), model(seq[:, t:t + 1], kv_cache=grown)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert grown.k.shape == whole.k.shape, "grown up to max_len, never past it"
    torch.testing.assert_close(grown.k, whole.k, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="max_len=12"):
        grown.update(0, torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))


def test_for_model_is_bounded_by_the_context_window():
    from qwen3_scratch.kv_cache import check_cache_length
    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=100)
    model = Qwen3Model(cfg)
    with pytest.raises(ValueError, match=r"max_len=101 is longer than the context window, max_position_embeddings=100"):
        KVCache.for_model(model, 1, 101)
    with pytest.raises(ValueError, match=r"max_len=10000000 is longer than .* max_position_embeddings=100"):
        check_cache_length(model, 10**7)
    assert KVCache.for_model(model, 1, 100).max_len == 100


@torch.no_grad()
def test_rewind_forgets_the_later_slots(model):
    """Chapter 20 takes back rejected draft tokens: after rewind(pos) the cache behaves as if only seq[:pos] had been
    read, in a cache that grows in blocks too (the forgotten slots are overwritten, never read)."""
    seq, guesses = ids(1, 9, seed=3), ids(1, 3, seed=4)
    for block_size in (None, 2):
        cache = KVCache.for_model(model, 1, 12, block_size=block_size)
        model(seq[:, :6], kv_cache=cache)
        model(guesses, kv_cache=cache)  # slots 6..8: three tokens that turn out wrong
        cache.rewind(6)
        assert cache.pos == 6
        redo = model(seq[:, 6:], kv_cache=cache)  # (1, 3, V) at slots 6..8
        fresh = KVCache.for_model(model, 1, 12)
        full = model(seq, kv_cache=fresh)
        torch.testing.assert_close(redo, full[:, 6:], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache.k[:, :, :, :9], fresh.k[:, :, :, :9], atol=1e-5, rtol=0)
        cache.rewind(0)
        assert cache.pos == 0
    for bad in (-1, 1, 2.0, True, None):
        with pytest.raises(ValueError, match="rewind: pos must be an integer from 0 to the 0 slots filled"):
            cache.rewind(bad)
