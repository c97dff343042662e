"""Chapter 15: YaRN and sliding-window attention against transformers (fp32, random weights, dense and MoE),
the rolling KV cache, chunked prefill, and the config keys that switch them on."""

import pytest
import torch
from hf_ref import tiny_hf_model
from transformers import Qwen3Config as HFConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.fast import fast_generate
from qwen3_scratch.generate import generate
from qwen3_scratch.hf_port import from_transformers, to_transformers
from qwen3_scratch.kv_cache import KVCache
from qwen3_scratch.long_context import (RollingKVCache, chunked_prefill, generate_long, loss_by_position, peak_memory,
                                        with_rope_scaling, with_sliding_window)
from qwen3_scratch.rope import rope_frequencies

QWEN_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen's docs
TINY_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
WINDOW = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)
KINDS = ["dense", "moe"]


@pytest.fixture(scope="module")
def hf_window():
    return {k: tiny_hf_model(moe=k == "moe", **WINDOW) for k in KINDS}


@pytest.mark.parametrize("scaling", [
    QWEN_YARN,
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 1000, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 512, "attention_factor": 1.2},
])
@pytest.mark.parametrize("head_dim, theta", [(128, 1e6), (64, 1e4)])
def test_yarn_tables_equal_transformers_bit_for_bit(scaling, head_dim, theta):
    hf = HFConfig(head_dim=head_dim, rope_theta=theta, max_position_embeddings=40960, rope_scaling=dict(scaling))
    inv_freq, scale = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours, ours_scale = rope_frequencies(head_dim, theta, scaling)
    assert torch.equal(ours, inv_freq) and ours_scale == scale


def test_config_reads_yarn_in_both_spellings_and_writes_it_back():
    released = Qwen3Config.from_preset("0.6B").to_hf()
    a = Qwen3Config.from_hf({**released, "rope_scaling": QWEN_YARN})
    tf5 = {k: v for k, v in released.items() if k != "rope_theta"}
    b = Qwen3Config.from_hf({**tf5, "rope_parameters": {**QWEN_YARN, "rope_theta": 1e6}})
    assert a == b and a.rope_scaling == QWEN_YARN and a.rope_theta == 1e6
    assert Qwen3Config.from_hf(a.to_hf()) == a
    # the old "type" key, and transformers' default for the original length (the native one)
    c = Qwen3Config.from_hf({**released, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    assert c.rope_scaling == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 40960}


def test_transformers_saved_yarn_config_is_read(tmp_path):
    hf = tiny_hf_model(rope_scaling=dict(TINY_YARN))
    hf.config.save_pretrained(tmp_path)  # transformers 5 writes rope_parameters
    cfg = Qwen3Config.from_hf(tmp_path)
    assert cfg.rope_scaling["factor"] == 4.0 and cfg.rope_scaling["original_max_position_embeddings"] == 32


@pytest.mark.parametrize("bad, match", [
    ({"rope_type": "linear", "factor": 2.0}, "rope scaling 'linear' is not implemented"),
    ({"type": "dynamic", "factor": 2.0}, "rope scaling 'dynamic' is not implemented"),
    ({"rope_type": "longrope", "factor": 2.0}, "rope scaling 'longrope' is not implemented"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 100}, "positive factor"),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 100}, "factor must be >= 1"),
    ({"rope_type": "yarn", "factor": 2.0, "partial_rotary_factor": 0.5}, r"\['partial_rotary_factor'\]"),
])
def test_other_rope_scalings_are_refused_by_name(bad, match, tmp_path):
    (tmp_path / "config.json").write_text(__import__("json").dumps({**Qwen3Config().to_hf(), "rope_scaling": bad}))
    with pytest.raises(ValueError, match=match) as e:
        Qwen3Config.from_hf(tmp_path)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("kind", KINDS)
def test_yarn_logits_equal_transformers(kind):
    hf = tiny_hf_model(moe=kind == "moe", rope_scaling=dict(TINY_YARN))
    ours = from_transformers(hf)
    assert ours.config.rope_scaling == TINY_YARN
    ids = torch.randint(0, 256, (2, 100))
    with torch.no_grad():
        theirs = hf(ids).logits
        torch.testing.assert_close(ours(ids), theirs, atol=1e-5, rtol=0)
        plain = from_transformers(tiny_hf_model(moe=kind == "moe"))(ids)
    assert (plain - theirs).abs().max() > 1e-4, "YaRN changes the logits (by ~1e-3 here): the test can fail"
    back = to_transformers(ours, "eager")  # our config.json spelling carries YaRN to transformers
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use, window, m, layers", [
    (False, 4096, 28, 28), (True, 4096, 28, 28), (True, 4096, 20, 28), (True, 64, 0, 4), (True, 16, 3, 4)])
def test_layer_types_as_transformers_derives_them(use, window, m, layers):
    hf = HFConfig(num_hidden_layers=layers, use_sliding_window=use, sliding_window=window, max_window_layers=m)
    d = {**Qwen3Config().to_hf(), "num_hidden_layers": layers, "use_sliding_window": use, "sliding_window": window,
         "max_window_layers": m}
    cfg = Qwen3Config.from_hf(d)
    assert cfg.layer_types == hf.layer_types
    assert Qwen3Config.from_hf(cfg.to_hf()) == cfg
    moe = Qwen3Config.from_preset("30B-A3B", num_hidden_layers=layers, use_sliding_window=use, sliding_window=window)
    assert moe.layer_types == ["sliding_attention" if use else "full_attention"] * layers, "MoE: every layer"


def test_sliding_window_config_errors_name_the_key():
    with pytest.raises(ValueError, match="use_sliding_window=true needs sliding_window"):
        Qwen3Config.from_hf({**Qwen3Config().to_hf(), "use_sliding_window": True, "sliding_window": None})
    with pytest.raises(ValueError, match="layer_types"):
        Qwen3Config.from_hf({**Qwen3Config().to_hf(), "layer_types": ["sliding_attention"] * 28})


@pytest.mark.parametrize("kind", KINDS)
def test_sliding_logits_and_greedy_equal_transformers(kind, hf_window):
    hf = hf_window[kind]
    ours = from_transformers(hf)
    assert ours.config.layer_types.count("sliding_attention") == (3 if kind == "moe" else 2)
    ids = torch.randint(1, 256, (2, 40))
    pad = torch.ones_like(ids)
    pad[0, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)
        real = pad.bool()
        torch.testing.assert_close(ours(ids, attention_mask=pad)[real], hf(ids, attention_mask=pad).logits[real],
                                   atol=1e-5, rtol=0)
        assert (from_transformers(tiny_hf_model(moe=kind == "moe"))(ids) - ours(ids)).abs().max() > 1e-2
    prompt = ids[:1, :12]
    theirs = hf.generate(prompt, max_new_tokens=36, do_sample=False, pad_token_id=0)  # 48 tokens = 6 windows
    assert torch.equal(generate(ours, prompt, 36), theirs), "chapter 9's generate"
    assert torch.equal(generate_long(ours, prompt, 36, chunk_size=5), theirs), "rolling cache + chunked prefill"
    assert torch.equal(fast_generate(ours, prompt, 36), theirs), "chapter 11's fast path"


def test_rolling_cache_is_bounded_and_matches_the_plain_cache(hf_window):
    model = from_transformers(hf_window["dense"])  # layer 0 full, layers 1-2 slide, W = 8
    seq = torch.randint(0, 256, (2, 60))
    plain, rolling = KVCache.for_model(model, 2, 60), RollingKVCache.for_model(model, 2, 60)
    with torch.no_grad():
        for t, step in ((0, 11), (11, 1), (12, 20), (32, 1), (33, 27)):
            a = model(seq[:, t:t + step], kv_cache=plain)
            b = model(seq[:, t:t + step], kv_cache=rolling)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert rolling.pos == 60 and rolling.first_slot() == 60 - 7
    assert rolling.k.shape[3] == 60 and [kb.shape[2] for kb, _ in rolling.sliding.values()] == [7, 7], \
        "max_len slots for the full layer (the parent KVCache), W - 1 per sliding layer"
    assert rolling.nbytes() < plain.nbytes()
    with pytest.raises(ValueError, match="KV cache is full"):
        model(seq[:, :1], kv_cache=rolling)
    with pytest.raises(ValueError, match="positive integer window"):
        RollingKVCache(["sliding_attention"], 1, 8, 1, 4, window=None)
    assert isinstance(rolling, KVCache), "built on chapter 9's cache, not beside it"


def test_rolling_cache_rewinds_only_where_it_is_exact():
    hf = tiny_hf_model(use_sliding_window=True, sliding_window=8, max_window_layers=1, num_hidden_layers=3)
    model = from_transformers(hf).eval()
    seq = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        rolling, fresh = RollingKVCache.for_model(model, 1, 32), RollingKVCache.for_model(model, 1, 32)
        model(seq[:, :6], kv_cache=rolling)  # 6 < W - 1 = 7 slots: nothing dropped yet
        rolling.rewind(4)
        a = model(seq[:, 4:9], kv_cache=rolling)
        model(seq[:, :4], kv_cache=fresh)
        b = model(seq[:, 4:9], kv_cache=fresh)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert rolling.first_slot() > 0  # 9 tokens: slots 0 and 1 are gone from the sliding layers
        with pytest.raises(ValueError, match="dropped slots"):
            rolling.rewind(8)


@pytest.mark.parametrize("window", [2, 3, 64])  # W = 1: transformers' sliding cache keeps every key (-0:)
def test_rolling_cache_edge_windows(window):
    hf = tiny_hf_model(use_sliding_window=True, sliding_window=window, max_window_layers=0)
    ours = from_transformers(hf)
    prompt = torch.randint(1, 256, (1, 9))
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(generate_long(ours, prompt, 12, chunk_size=4), theirs)


@pytest.mark.parametrize("chunk", [1, 3, 16, 50, 64])
def test_chunked_prefill_gives_the_same_logits(chunk, hf_window):
    for kind in KINDS:
        model = from_transformers(hf_window[kind])
        ids = torch.randint(0, 256, (2, 50))
        with torch.no_grad():
            whole = model(ids)
        for cache in (KVCache.for_model(model, 2, 50), RollingKVCache.for_model(model, 2, 50)):
            torch.testing.assert_close(chunked_prefill(model, ids, cache, chunk), whole, atol=1e-5, rtol=0)
        last = chunked_prefill(model, ids, RollingKVCache.for_model(model, 2, 50), chunk, last_only=True)
        torch.testing.assert_close(last, whole[:, -1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_prefill(model, ids, KVCache.for_model(model, 2, 50), 0)


def test_switching_a_model_to_yarn_and_to_a_window_in_place(hf_window):
    model = from_transformers(tiny_hf_model())
    ids = torch.randint(0, 256, (1, 64))
    with torch.no_grad():
        before = model(ids)
        with_rope_scaling(model, dict(TINY_YARN))
        torch.testing.assert_close(model(ids), from_transformers(tiny_hf_model(rope_scaling=dict(TINY_YARN)))(ids),
                                   atol=1e-5, rtol=0)
        with_rope_scaling(model, None)
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
        with_sliding_window(model, 8, 1)
        # tiny_hf_model draws the same weights whatever the window: compare with transformers' windowed model
        torch.testing.assert_close(model(ids), hf_window["dense"](ids).logits, atol=1e-5, rtol=0)
        assert (model(ids) - before).abs().max() > 1e-2
        assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="rope scaling 'linear'"):
        with_rope_scaling(model, {"rope_type": "linear", "factor": 2.0})
    assert model.config.rope_scaling is None, "a refused scaling changes nothing"


def test_loss_by_position_is_the_mean_cross_entropy():
    model = from_transformers(tiny_hf_model())
    seqs = torch.randint(0, 256, (3, 21))
    per_pos = loss_by_position(model, seqs, batch_size=2)
    with torch.no_grad():
        logits = model(seqs[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), seqs[:, 1:], reduction="none").mean(0)
    assert per_pos.shape == (20,)
    torch.testing.assert_close(per_pos.float(), ce, atol=1e-5, rtol=0)


def test_peak_memory_sees_a_big_temporary_allocation():
    if not __import__("pathlib").Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    out, peak = peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum().item())  # 64 MiB, freed at once
    assert out == 64 * 2**20 // 4 and peak >= 60 * 2**20
