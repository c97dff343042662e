"""The fast decode path (qwen3_scratch/fast.py): static cache bookkeeping and token-for-token equality with
chapter 9's plain generate, eager and compiled."""
import time
import warnings

import pytest
import torch

from hf_ref import tiny_kwargs
from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.fast import FixedShapeKVCache, cache_length, fast_generate, forward_step
from qwen3_scratch.generate import generate
from qwen3_scratch.kv_cache import KVCache
from qwen3_scratch.model import Qwen3Model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


def tiny_model(seed=0, std=0.3, moe=False, **over):
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**tiny_kwargs(moe, **over))).eval()
    with torch.no_grad():  # larger random weights than the default init: varied greedy tokens, a sharper test
        for p in model.parameters():
            p.normal_(0, std)
    return model


def test_fixed_shape_cache_writes_at_pos_and_returns_whole_buffer():
    cache = FixedShapeKVCache(num_layers=2, batch_size=2, max_len=8, num_kv_heads=3, head_dim=4)
    k, v = torch.randn(2, 3, 3, 4), torch.randn(2, 3, 3, 4)  # (B, K, T, Dh)
    cache.advance(4)
    pos = cache.pos
    k_all, v_all = cache.update(1, k, v)
    assert k_all.shape == v_all.shape == (2, 3, 8, 4)
    assert torch.equal(k_all[:, :, 4:7], k) and torch.equal(v_all[:, :, 4:7], v)
    assert not k_all[:, :, :4].any() and not k_all[:, :, 7:].any(), "only slots 4..6 may be written"
    assert not cache.k[0].any(), "layer 0 must be untouched"
    assert k_all.data_ptr() == cache.k[1].data_ptr(), "update must write in place (fixed address for CUDA graphs)"
    cache.advance(3)
    assert cache.pos is pos and cache.pos.tolist() == [7], "advance moves pos on in place (same tensor)"
    cache.reset()
    assert cache.pos.tolist() == [0]
    assert cache.nbytes() == 2 * 2 * (2 * 3 * 8 * 4) * 4


def test_fixed_shape_cache_mask_is_causal_in_absolute_positions():
    cache = FixedShapeKVCache(1, 1, 7, 1, 2)
    mask = cache.mask(cache.positions(3))  # prefill of 3 tokens
    assert mask.shape == (1, 1, 3, 7) and mask.dtype == torch.bool
    expected = torch.arange(7)[None, :] <= torch.arange(3)[:, None]
    assert torch.equal(mask[0, 0], expected)
    cache.advance(4)
    step = cache.mask(cache.positions(1))[0, 0, 0]  # decode at position 4: slots 0..4 visible
    assert step.tolist() == [True] * 5 + [False] * 2


def test_prefill_and_decode_logits_match_the_plain_forward():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 9))
    cache = FixedShapeKVCache.for_model(model, 2, 32)
    with torch.no_grad():
        logits = forward_step(model, cache, ids[:, :8])  # (B, V): the prefill
        full = model(ids)  # (B, T, V)
        torch.testing.assert_close(logits, full[:, 7], rtol=1e-5, atol=1e-5)
        step = forward_step(model, cache, ids[:, 8:9])
        torch.testing.assert_close(step, full[:, 8], rtol=1e-5, atol=1e-5)
        assert cache.pos.tolist() == [9], "the model's forward advances the cache"
        # the same step through chapter 9's cache
        plain = KVCache.for_model(model, 2, 16)
        model(ids[:, :8], kv_cache=plain)
        torch.testing.assert_close(step, model(ids[:, 8:9], kv_cache=plain)[:, -1], rtol=1e-5, atol=1e-5)


def test_all_logits_and_rewind_for_speculative_decoding():
    """Chapter 20's verify pass: last_only=False gives the logits of every new token, and rewind(pos) takes tokens
    back so that the next forward sees only the slots before pos."""
    model = tiny_model()
    ids, wrong = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 3))
    cache = FixedShapeKVCache.for_model(model, 1, 16)
    with torch.no_grad():
        full = model(ids)  # (1, 9, V)
        forward_step(model, cache, ids[:, :5])
        forward_step(model, cache, wrong, last_only=False)  # slots 5..7, then taken back
        pos = cache.pos
        cache.rewind(5)
        assert cache.pos is pos and cache.pos.tolist() == [5], "rewind moves pos in place (same tensor)"
        logits = forward_step(model, cache, ids[:, 5:], last_only=False)  # (1, 4, V)
    assert logits.shape == (1, 4, 256)
    torch.testing.assert_close(logits, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_masked_decode_step_folds_query_heads_instead_of_enable_gqa(monkeypatch):
    """Chapter 4's attention: a single query with a mask goes to SDPA as (B, K, G, Dh), without enable_gqa (the
    combination that falls back to the math kernel on CUDA), and gives the same logits."""
    import torch.nn.functional as F
    model = tiny_model()
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((tuple(q.shape), kw.get("enable_gqa", False), kw.get("attn_mask") is not None))
        return sdpa(q, k, v, **kw)

    ids = torch.randint(0, 256, (1, 6))
    cache = FixedShapeKVCache.for_model(model, 1, 16)
    with torch.no_grad():
        forward_step(model, cache, ids[:, :5])
        full = model(ids)[:, -1]  # (B, V)
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        step = forward_step(model, cache, ids[:, 5:])
        monkeypatch.undo()
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    cfg = model.config
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    assert G > 1, "weak test: tiny_kwargs should have fewer kv heads than query heads"
    assert calls and all(c == ((1, cfg.num_key_value_heads, G, cfg.head_dim), False, True) for c in calls), calls


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_greedy_equals_plain_generate(batch_size, seed):
    model = tiny_model(seed)
    ids = torch.randint(0, 256, (batch_size, 5 + seed), generator=torch.Generator().manual_seed(seed))
    plain = generate(model, ids, 40)
    fast = fast_generate(model, ids, 40)
    assert fast.shape == plain.shape == (batch_size, ids.shape[1] + 40)
    assert torch.equal(fast, plain), f"first difference at {(fast != plain).nonzero()[:1].tolist()}"
    assert len(set(plain[0, ids.shape[1]:].tolist())) >= 3, "weak test: greedy output is nearly constant"


def test_fast_sampling_and_eos_follow_plain_generate():
    model = tiny_model(3)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.8, top_k=20)
    plain = generate(model, ids, 30, generator=torch.Generator().manual_seed(7), **kw)
    fast = fast_generate(model, ids, 30, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(fast, plain), "same logits and the same generator should sample the same tokens"
    greedy = generate(model, ids, 12)
    eos = [int(greedy[0, -5]), int(greedy[1, -3])]  # tokens greedy decoding reaches in each row
    for kw in (dict(eos_token_id=eos[0]), dict(eos_token_id=eos), dict(eos_token_id=eos, pad_token_id=0)):
        plain, fast = generate(model, ids, 30, **kw), fast_generate(model, ids, 30, **kw)
        assert plain.shape[1] < ids.shape[1] + 30 or kw["eos_token_id"] == eos[0], "weak test: no early stop"
        assert torch.equal(fast, plain), f"eos handling must match chapter 9 ({kw})"


def test_moe_runs_the_eager_step_and_matches_plain():
    model = tiny_model(0, moe=True)
    ids = torch.randint(0, 256, (1, 6))
    with pytest.warns(UserWarning, match="MoE"):
        fast = fast_generate(model, ids, 12, compile=True)
    assert torch.equal(fast, generate(model, ids, 12))


def test_cache_length_is_bounded_and_the_cache_is_freed(monkeypatch):
    model = tiny_model()  # tiny_kwargs: max_position_embeddings = 256
    assert cache_length(model, 20) == 256 and cache_length(model, 20, 64) == 64
    for bad in (10**7, 19, 2.5e2, True):
        with pytest.raises(ValueError, match="max_len"):
            cache_length(model, 20, bad)
    made = []
    real = FixedShapeKVCache.for_model.__func__

    def spy(cls, *a):
        made.append(real(cls, *a))
        return made[-1]

    monkeypatch.setattr(FixedShapeKVCache, "for_model", classmethod(spy))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        fast_generate(model, ids, 8, max_len=10**7)
    assert not made, "nothing may be allocated before the checks"
    fast_generate(model, ids, 8)
    assert len(made) == 1 and made[0].max_len == 256
    assert not hasattr(model, "static_cache"), "no cache is left on the model"
    import weakref
    ref = weakref.ref(made.pop())
    assert ref() is None, "the cache must be freed when fast_generate returns"


def test_bad_ids_and_temperatures_name_the_culprit():
    model = tiny_model()
    for bad in (256, 10**6, -1):
        ids = torch.tensor([[1, 2, bad]])
        with pytest.raises(ValueError, match=rf"input_ids\[0, 2\] = {bad} is not a token id .*vocab_size=256"):
            fast_generate(model, ids, 4)
    for t in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            fast_generate(model, torch.ones(1, 3, dtype=torch.long), 4, temperature=t)
    with pytest.raises(ValueError, match="stop_check_every"):
        fast_generate(model, torch.ones(1, 3, dtype=torch.long), 4, stop_check_every=0)


def test_bad_lengths_name_the_culprit():
    model = tiny_model()
    ids = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="max_len"):
        fast_generate(model, ids, 20, max_len=16)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        fast_generate(model, ids, 300)  # tiny_kwargs: max_position_embeddings = 256
    # the same checks as chapter 9's generate, with the same messages
    with pytest.raises(ValueError, match="top_p"):
        fast_generate(model, ids, 4, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="eos_token_id"):
        fast_generate(model, ids, 4, eos_token_id="<|im_end|>")
    with pytest.raises(ValueError, match="input_ids"):
        fast_generate(model, ids[0], 4)


@pytest.mark.parametrize("every", [1, 3, 16, 100])
def test_stop_tokens_are_read_back_only_every_k_tokens(monkeypatch, every):
    """GPU-ready: the host learns whether every row has stopped once per `every` tokens, not once per token,
    and the tokens generated past the real end are cut off: the output equals plain generate's."""
    model = tiny_model(3)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, ids, 12)
    eos = [int(greedy[0, -5]), int(greedy[1, -3])]
    plain = generate(model, ids, 40, eos_token_id=eos)
    reads = []
    real_bool = torch.Tensor.__bool__

    def counting_bool(t):
        reads.append(1)
        return real_bool(t)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    fast = fast_generate(model, ids, 40, eos_token_id=eos, stop_check_every=every)
    monkeypatch.undo()
    assert torch.equal(fast, plain), "trimming after a late check must give plain generate's tokens"
    n = plain.shape[1] - ids.shape[1]
    assert n < 40, "weak test: no early stop"
    assert len(reads) <= -(-n // every) + 2, f"{len(reads)} reads back for {n} tokens, checking every {every}"


def test_compiled_graph_capture_fullgraph_aot_eager():
    """Dynamo captures the decode step as one graph (fullgraph=True) and the in-place cache writes survive
    functionalization. aot_eager skips code generation, so this runs in seconds on any machine."""
    torch._dynamo.reset()
    model = tiny_model(1)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    out = fast_generate(model, ids, 20, compile=True, backend="aot_eager")
    assert torch.equal(out, generate(model, ids, 20))
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    again = fast_generate(model, ids, 12, compile=True, backend="aot_eager")  # a fresh cache of the same shape
    assert torch.equal(again, out[:, :again.shape[1]])
    assert counters["stats"]["unique_graphs"] == graphs, "a new call (new cache, same shapes) must not recompile"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor + CUDA graphs: a GPU test (on a CPU a cold "
                    "inductor compile takes ~40 s on 2 cores; test_compiled_graph_capture_fullgraph_aot_eager covers "
                    "the graph capture there)")
def test_compiled_inductor_reduce_overhead_equals_plain():
    """The real fast path: inductor, mode="reduce-overhead", replayed as a CUDA graph, equals the plain path."""
    torch._dynamo.reset()
    model = tiny_model(2).cuda()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(2)).cuda()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fast_generate(model, ids, 24, compile=True)
    assert torch.equal(out, generate(model, ids, 24)), "compiled greedy output differs from the plain path"
    again = fast_generate(model, ids, 24, compile=True)  # replays the compiled step, no recompilation
    assert torch.equal(again, out)
    print(f"compile + generate: {time.perf_counter() - t0:.1f} s on cuda")
