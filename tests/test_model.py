"""Tests for qwen3_scratch.model: the block, the mask, the whole model against transformers, counting."""
import dataclasses

import pytest
import torch

from hf_ref import tiny_hf_model, tiny_kwargs
from qwen3_scratch.config import PRESETS, Qwen3Config
from qwen3_scratch.hf_port import from_transformers, state_dict_from_hf
from qwen3_scratch.kv_cache import KVCache
from qwen3_scratch.model import Qwen3Block, Qwen3Model, build_mask, config_param_counts
from qwen3_scratch.moe import Qwen3MoE
from qwen3_scratch.rope import RotaryEmbedding, rope_inv_freq


def ported(hf) -> Qwen3Model:
    """Our model holding the reference's weights; strict loading proves the parameter names match."""
    return from_transformers(hf)


def tiny_config(**over) -> Qwen3Config:
    return Qwen3Config(**{**tiny_kwargs(moe=False), **over})


MODELS = {  # name -> keyword arguments of tiny_hf_model
    "dense_tied": dict(moe=False),
    "moe_mlp_only_layers": dict(moe=True),  # mlp_only_layers=[1], untied
    "moe_sparse_step_2": dict(moe=True, num_hidden_layers=4, mlp_only_layers=[], decoder_sparse_step=2),
}


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request):
    hf = tiny_hf_model(**MODELS[request.param])
    return request.param, hf, ported(hf)


def test_logits_match_transformers(pair):
    name, hf, ours = pair
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-5, f"{name}: max |ours - transformers| = {diff}"


def test_moe_layers_sit_where_transformers_puts_them(pair):
    name, hf, ours = pair
    ref = ["SparseMoe" in type(layer.mlp).__name__ for layer in hf.model.layers]
    assert [isinstance(layer.mlp, Qwen3MoE) for layer in ours.layers] == ref, name
    assert [ours.config.is_moe_layer(i) for i in range(len(ref))] == ref, name


@pytest.mark.parametrize("over", [dict(num_hidden_layers=6, decoder_sparse_step=3, mlp_only_layers=[]),
                                  dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3, 4]),
                                  dict(num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[0, 3])])
def test_moe_placement_rule_equals_transformers(over):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    kw = tiny_kwargs(moe=True, **over)
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw))
        ours = Qwen3Model(Qwen3Config(**kw))
    ref = ["SparseMoe" in type(layer.mlp).__name__ for layer in hf.model.layers]
    assert [isinstance(layer.mlp, Qwen3MoE) for layer in ours.layers] == ref, over
    assert any(ref) and not all(ref), "each case mixes dense and MoE layers"


def test_parameter_names_are_the_checkpoint_names_minus_model_prefix(pair):
    name, hf, ours = pair
    assert set(ours.state_dict()) == set(state_dict_from_hf(hf.state_dict())), name
    if name == "dense_tied":  # no fused experts: the names map one to one
        assert {k.removeprefix("model.") for k in hf.state_dict()} == set(ours.state_dict())


def test_weight_tying():
    tied = Qwen3Model(tiny_config(tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert sum(p.numel() for p in tied.parameters()) == config_param_counts(tied.config)["total"]
    untied = Qwen3Model(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert config_param_counts(untied.config)["total"] - config_param_counts(tied.config)["total"] == 256 * 64
    model = ported(tiny_hf_model(moe=False))
    assert model.lm_head.weight is model.embed_tokens.weight, "loading a tied checkpoint keeps one Parameter"


def test_shapes_and_last_only():
    torch.manual_seed(0)
    model = Qwen3Model(tiny_config()).eval()
    ids = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        full, last = model(ids), model(ids, last_only=True)
    assert full.shape == (3, 9, 256) and last.shape == (3, 1, 256)
    assert torch.allclose(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids[0])


def test_block_matches_transformers_decoder_layer():
    for moe in (False, True):
        hf = tiny_hf_model(moe=moe)
        layer_idx = 0  # MoE in the MoE model (mlp_only_layers=[1]), dense in the dense one
        hf_layer = hf.model.layers[layer_idx]
        cfg = Qwen3Config.from_hf(hf.config.to_dict())
        block = Qwen3Block(cfg, layer_idx).eval()
        prefix = f"layers.{layer_idx}."
        block.load_state_dict({k[len(prefix):]: v for k, v in state_dict_from_hf(hf.state_dict()).items()
                               if k.startswith(prefix)}, strict=True)
        B, T = 2, 6
        x = torch.randn(B, T, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
        cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(T).expand(B, T))
        causal = torch.full((T, T), float("-inf")).triu(1)[None, None]  # additive mask for eager attention
        with torch.no_grad():
            ref = hf_layer(x, attention_mask=causal, position_embeddings=(cos, sin))
            ref = ref[0] if isinstance(ref, tuple) else ref
            diff = (block(x, cos, sin) - ref).abs().max().item()
        assert diff <= 1e-5, f"block (moe={moe}) differs from transformers by {diff}"


def test_block_is_prenorm_with_two_residuals():
    torch.manual_seed(0)
    cfg = tiny_config()
    block = Qwen3Block(cfg, 0).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, 0.0, 0.2)
    x = torch.randn(2, 5, cfg.hidden_size)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(torch.arange(5).expand(2, 5))
    with torch.no_grad():
        h = x + block.self_attn(block.input_layernorm(x), cos, sin)
        assert torch.allclose(block(x, cos, sin), h + block.mlp(block.post_attention_layernorm(h)), atol=1e-6)
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
        assert torch.equal(block(x, cos, sin), x), "with zero write-back projections the block is the identity"


@pytest.mark.parametrize("moe", [False, True])
def test_left_padded_batch_equals_single_rows(moe):
    model = ported(tiny_hf_model(moe=moe))
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 256, (n,), generator=g) for n in (4, 10, 7)]
    T = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])  # (3, T)
    mask = torch.stack([torch.cat([torch.zeros(T - len(r)), torch.ones(len(r))]) for r in rows]).long()
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)
        assert torch.isfinite(padded).all()
        for i, r in enumerate(rows):
            alone = model(r[None])[0]
            diff = (padded[i, T - len(r):] - alone).abs().max().item()
            assert diff <= 1e-5, f"row {i}: padded logits differ from the row alone by {diff}"


def test_cached_prefill_and_decode_equal_full_forward():
    model = ported(tiny_hf_model(moe=True))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], kv_cache=cache)]  # prefill 5, then 2 tokens, then 1 and 1
        steps += [model(ids[:, 5:7], kv_cache=cache), model(ids[:, 7:8], kv_cache=cache), model(ids[:, 8:9], kv_cache=cache)]
    assert cache.pos == 9
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_build_mask():
    assert build_mask(5, 0) is None and build_mask(1, 7) is None, "plain causal cases leave it to SDPA"
    causal = build_mask(3, 0, torch.ones(2, 3))
    assert causal.shape == (2, 1, 3, 3) and torch.equal(causal[1, 0], torch.ones(3, 3, dtype=torch.bool).tril())
    offset = build_mask(2, 3)
    assert offset.shape == (1, 1, 2, 5)
    assert offset[0, 0].tolist() == [[True, True, True, True, False], [True] * 5]
    pad = build_mask(4, 0, torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert not pad[0, 0, 2:, :2].any(), "real queries never see pad slots"
    assert pad[0, 0].diagonal().all(), "every query sees itself"
    assert torch.equal(pad[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    with_cache = build_mask(1, 3, torch.tensor([[0, 1, 1, 1]]))  # decode step of a padded row
    assert with_cache[0, 0, 0].tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="attention_mask covers 3 slots, but past \\+ T = 4"):
        build_mask(2, 2, torch.ones(1, 3))


def test_meta_build_keeps_real_rope_frequencies():
    cfg = tiny_config()
    with torch.device("meta"):
        model = Qwen3Model(cfg)
    assert model.lm_head.weight.is_meta and not model.rotary.inv_freq.is_meta
    assert torch.equal(model.rotary.inv_freq, rope_inv_freq(cfg.head_dim, cfg.rope_theta))


def test_config_param_counts_active_by_hand():
    cfg = Qwen3Config(**tiny_kwargs(moe=True))  # 3 layers, layer 1 dense; E=8, A=2, I_moe=32, untied
    c = config_param_counts(cfg)
    model = Qwen3Model(cfg)
    assert c["total"] == sum(p.numel() for p in model.parameters())
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert c["total"] - c["active"] == 2 * (8 - 2) * per_expert, "two MoE layers, six idle experts each"
    assert c["embedding"] == c["lm_head"] == 256 * 64
    assert config_param_counts(dataclasses.replace(cfg, rope_theta=5e6)) == c, "RoPE base changes no shape"


# every preset on the meta device: shapes and parameter counts (config from chapter 00, model from chapter 07)
def test_every_preset_builds_on_meta():
    for name in PRESETS:
        cfg = Qwen3Config.from_preset(name, num_hidden_layers=1)  # full width, one layer: fast
        with torch.device("meta"):
            model = Qwen3Model(cfg)
        attn = model.layers[0].self_attn
        assert attn.q_proj.weight.shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size), name
        assert attn.k_proj.weight.shape == (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size), name
        assert model.embed_tokens.weight.is_meta
        assert (model.lm_head.weight is model.embed_tokens.weight) == cfg.tie_word_embeddings, name
        if cfg.num_experts:
            assert len(model.layers[0].mlp.experts) == cfg.num_experts, name


def full_counts(name):
    """config_param_counts of a preset. The two largest MoE models take several seconds to build in full, so here
    they are extrapolated from 1- and 2-layer builds (every layer has the same shape); the notebook builds
    them whole. Exact either way: total(L) = total(1) + (L - 1) * (total(2) - total(1))."""
    cfg = Qwen3Config.from_preset(name)
    if cfg.num_hidden_layers * cfg.num_experts < 8_000:  # all but 235B-A22B and Coder-480B-A35B
        return config_param_counts(cfg)
    one, two = (config_param_counts(Qwen3Config.from_preset(name, num_hidden_layers=n)) for n in (1, 2))
    return {k: one[k] + (cfg.num_hidden_layers - 1) * (two[k] - one[k]) for k in one}


def test_counts_of_every_preset():
    counts = {name: full_counts(name) for name in PRESETS}
    assert counts["0.6B"]["total"] == 596_049_920
    assert counts["0.6B"]["embedding"] == 151_936 * 1024 and counts["0.6B"]["lm_head"] == 0
    assert counts["30B-A3B"]["total"] == 30_532_122_624
    # model cards, in billions (total, non-embedding), rounded as the cards round them
    cards = {"0.6B": ("0.6", "0.44"), "1.7B": ("1.7", "1.4"), "4B": ("4.0", "3.6"), "8B": ("8.2", "6.95"),
             "14B": ("14.8", "13.2"), "32B": ("32.8", "31.2"), "30B-A3B": ("30.5", "29.9"), "235B-A22B": ("235", "234")}
    for name, card in cards.items():
        ours = tuple(f"{counts[name][k] / 1e9:.{len(s.partition('.')[2])}f}" for k, s in zip(("total", "non_embedding"), card))
        assert ours == card, (name, ours, card)
    for name, active in (("30B-A3B", 3.35), ("235B-A22B", 22.2), ("Coder-480B-A35B-Instruct", 35.5)):
        assert round(counts[name]["active"] / 1e9, 2 if active < 10 else 1) == active, (name, counts[name])
    assert round(counts["Coder-480B-A35B-Instruct"]["total"] / 1e9) == 480
    for name, c in counts.items():
        dense = PRESETS[name]["model_type"] == "qwen3"
        assert (c["active"] == c["total"]) == dense, name
        assert c["total"] == c["embedding"] + c["lm_head"] + c["non_embedding"]
    for sibling in ("4B-Instruct-2507", "4B-Thinking-2507"):
        assert counts[sibling] == counts["4B"], "2507 changed context and RoPE base, not the shapes"
    assert counts["30B-A3B-Thinking-2507"] == counts["Coder-30B-A3B-Instruct"] == counts["30B-A3B"]


@pytest.mark.parametrize("name", ["0.6B", "30B-A3B"])
def test_counts_equal_transformers_on_meta(name):
    from transformers import Qwen3Config as HFConfig, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3Config.from_preset(name)
    moe = cfg.model_type == "qwen3_moe"
    with torch.device("meta"):
        hf = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)((Qwen3MoeConfig if moe else HFConfig)(**cfg.to_hf()))
    assert config_param_counts(cfg)["total"] == sum(p.numel() for p in hf.parameters())


def test_untying_adds_exactly_the_lm_head():
    tied = config_param_counts(Qwen3Config.from_preset("0.6B"))
    untied = config_param_counts(Qwen3Config.from_preset("0.6B", tie_word_embeddings=False))
    assert untied["total"] - tied["total"] == 151_936 * 1024 == untied["lm_head"]


def test_positions_past_the_context_window_are_refused():
    """RoPE's angles are only trained up to max_position_embeddings: a longer input, with or without a cache, is a
    one-line error naming the limit, on every path (not only where generate checks it)."""
    cfg = Qwen3Config(**{**tiny_kwargs(), "max_position_embeddings": 16})
    model = Qwen3Model(cfg).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 16, dtype=torch.long)).shape[1] == 16  # exactly the window is fine
        with pytest.raises(ValueError, match=r"positions 0..16 go past the context window, max_position_embeddings=16"):
            model(torch.zeros(1, 17, dtype=torch.long))
        cache = KVCache(cfg.num_hidden_layers, 1, 16, cfg.num_key_value_heads, cfg.head_dim)
        model(torch.zeros(1, 10, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=r"positions 0..16 go past"):
            model(torch.zeros(1, 7, dtype=torch.long), kv_cache=cache)
