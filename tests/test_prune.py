"""Tests for chapter 19's pruning: smaller configs and their refusals, pruning nothing changes nothing, pruning a
layer / KV group / SwiGLU channel / hidden channel equals zeroing it (exactly, or up to rms_norm_eps for hidden
channels), the importance measures, greedy depth pruning, and a pruned checkpoint that transformers loads with the
same logits, tied and untied."""
import pytest
import torch

from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.pretrain import init_weights, tiny_config
from qwen3_scratch.prune import (choose_layers, half_config, keep_layers, layer_importance, prune, prune_width,
                                 smaller_config, width_importance, without_layers)


def _random_model(seed=0, tie=True, eps=1e-12):
    cfg = tiny_config(300, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, rms_norm_eps=eps)
    model = init_weights(Qwen3Model(cfg), std=0.2, seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # norms away from 1, so a weight that is dropped or mis-scaled shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 300, (2, 12), generator=g)
    return x, [(x, torch.roll(x, -1, 1))]


def _all(n):
    return torch.arange(n, 0, -1).float()  # scores that keep everything, in order


def _scores(model, **cut):
    """Scores that keep every unit except those listed: cut = dict(hidden=[...], heads=(layer, group), mlp=...)."""
    c = model.config
    L = len(model.layers)
    s = {"hidden": _all(c.hidden_size), "heads": _all(c.num_key_value_heads).repeat(L, 1),
         "mlp": _all(c.intermediate_size).repeat(L, 1)}
    for d in cut.get("hidden", []):
        s["hidden"][d] = -1
    for layer, g in cut.get("heads", []):
        s["heads"][layer, g] = -1
    for layer, ch in cut.get("mlp", []):
        s["mlp"][layer, ch] = -1
    return s


def test_smaller_config_and_refusals():
    cfg = tiny_config(4096, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1280)
    half = half_config(cfg)
    assert (half.num_hidden_layers, half.hidden_size, half.num_attention_heads, half.num_key_value_heads,
            half.intermediate_size, half.head_dim, half.vocab_size) == (4, 256, 4, 2, 640, 64, 4096)
    assert half_config(half) == smaller_config(half, 2, 128, 1, 320)
    with pytest.raises(ValueError, match="hidden_size must be an integer between 1 and the model's 512"):
        smaller_config(cfg, hidden_size=1024)
    with pytest.raises(ValueError, match="experts"):
        smaller_config(tiny_config(moe=True), num_hidden_layers=2)


def test_pruning_nothing_changes_nothing(data):
    x, batches = data
    for tie in (True, False):
        model = _random_model(tie=tie)
        same = prune_width(model, model.config, _scores(model))
        kept = keep_layers(model, range(3))
        with torch.no_grad():
            ref = model(x)
            assert torch.equal(same(x), ref) and torch.equal(kept(x), ref)
        assert (same.lm_head.weight is same.embed_tokens.weight) == tie


def test_pruning_equals_zeroing(data):
    x, _ = data
    model = _random_model()
    cfg, G, Dh = model.config, 2, model.config.head_dim
    with torch.no_grad():
        # a whole layer: zero what it writes into the residual stream, and it adds nothing
        zeroed = keep_layers(model, range(3))
        zeroed.layers[1].self_attn.o_proj.weight.zero_()
        zeroed.layers[1].mlp.down_proj.weight.zero_()
        torch.testing.assert_close(keep_layers(model, [0, 2])(x), zeroed(x), rtol=0, atol=1e-5)
        with without_layers(model, [1]):
            torch.testing.assert_close(model(x), zeroed(x), rtol=0, atol=1e-5)
        # KV group 1 of layer 0 (query heads 2, 3) and SwiGLU channel 7 of layer 2
        zeroed = keep_layers(model, range(3))
        zeroed.layers[0].self_attn.o_proj.weight[:, 1 * G * Dh:2 * G * Dh] = 0
        zeroed.layers[2].mlp.down_proj.weight[:, 7] = 0
        small = smaller_config(cfg, num_key_value_heads=1, intermediate_size=cfg.intermediate_size - 1)
        s = _scores(model, heads=[(0, 1)], mlp=[(2, 7)])
        s["heads"][1:, 1] = 5  # layers 1, 2 drop group 0 instead
        s["mlp"][:2, 3] = -1  # layers 0, 1 drop channel 3
        zeroed.layers[1].self_attn.o_proj.weight[:, :G * Dh] = 0
        zeroed.layers[2].self_attn.o_proj.weight[:, :G * Dh] = 0
        zeroed.layers[0].mlp.down_proj.weight[:, 3] = 0
        zeroed.layers[1].mlp.down_proj.weight[:, 3] = 0
        torch.testing.assert_close(prune_width(model, small, s)(x), zeroed(x), rtol=0, atol=1e-5)
        # hidden channels 5 and 30: zero in the embedding and in every writer, and the stream never holds them
        zeroed = keep_layers(model, range(3))
        for d in (5, 30):
            zeroed.embed_tokens.weight[:, d] = 0
            for layer in zeroed.layers:
                layer.self_attn.o_proj.weight[d] = 0
                layer.mlp.down_proj.weight[d] = 0
        narrow = smaller_config(cfg, hidden_size=cfg.hidden_size - 2)
        pruned = prune_width(zeroed, narrow, _scores(model, hidden=[5, 30]))
        ref = zeroed(x)  # exact up to rms_norm_eps (1e-12 here): RMSNorm averages over 46 channels, not 48
        torch.testing.assert_close(pruned(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
        # ... and the sqrt(D / D') gain on the norms is what makes it so
        for norm in [pruned.norm] + [n for layer in pruned.layers for n in (layer.input_layernorm,
                                                                            layer.post_attention_layernorm)]:
            norm.weight /= (48 / 46) ** 0.5
        assert (pruned(x) - ref).abs().max() > 1e-2


def test_importance_measures(data):
    x, batches = data
    model = _random_model()
    imp = layer_importance(model, batches)
    assert len(imp["loss_increase"]) == len(imp["block_importance"]) == 3
    with torch.no_grad():  # a layer that writes nothing: removing it changes nothing, and it turns nothing
        model.layers[2].self_attn.o_proj.weight.zero_()
        model.layers[2].mlp.down_proj.weight.zero_()
    imp = layer_importance(model, batches)
    assert abs(imp["loss_increase"][2]) < 1e-6 and abs(imp["block_importance"][2]) < 1e-6
    kept, trace = choose_layers(model, 2, batches)
    assert kept == [0, 1] and trace[0]["dropped"] == 2
    s = width_importance(model, batches)
    assert s["heads"].shape == (3, 2) and s["mlp"].shape == (3, 40) and s["hidden"].shape == (48,)
    with torch.no_grad():  # a channel that is never written is never important
        model.layers[0].mlp.up_proj.weight[11] = 0
        model.layers[1].self_attn.v_proj.weight[:8] = 0  # kv head 0 of layer 1 carries nothing
    s = width_importance(model, batches)
    assert s["mlp"][0, 11] == 0 and s["heads"][1, 0] == 0 and s["heads"][1, 1] > 0


@pytest.mark.parametrize("tie", [True, False])
def test_pruned_model_loads_in_transformers(tmp_path, data, tie):
    from transformers import AutoModelForCausalLM

    from qwen3_scratch.weights import load_pretrained, save_pretrained
    x, batches = data
    model = _random_model(tie=tie, eps=1e-6)
    target = smaller_config(model.config, num_hidden_layers=2, hidden_size=32, num_key_value_heads=1,
                            intermediate_size=24)
    pruned, report = prune(model, target, batches)
    assert report["kept_layers"] == sorted(report["kept_layers"]) and len(report["kept_layers"]) == 2
    save_pretrained(pruned, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_pretrained(tmp_path, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ref = hf(x).logits
        torch.testing.assert_close(ours(x), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(pruned(x), ref, rtol=0, atol=1e-5)
    assert hf.config.num_attention_heads == 2 and hf.config.hidden_size == 32
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == tie
