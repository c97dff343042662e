"""Tests for qwen3_scratch.config (chapter 00): presets, reading config.json in both spellings, refusals.
The parameter counts of every preset need the model: they are in test_model.py (chapter 07)."""
import json

import pytest

from qwen3_scratch.config import HF_REPOS, PRESETS, Qwen3Config, preset_name

# Qwen/Qwen3-30B-A3B-Thinking-2507/config.json as released (transformers 4.51 spelling)
RELEASED_30B_2507 = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 262144, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# the same model as transformers 5 writes it: rope_parameters and num_local_experts
TF5_30B_2507 = {k: v for k, v in RELEASED_30B_2507.items() if k not in ("rope_theta", "rope_scaling", "num_experts")}
TF5_30B_2507.update(rope_parameters={"rope_theta": 10000000, "rope_type": "default"}, num_local_experts=128,
                    dtype="bfloat16", transformers_version="5.7.0")
RELEASED_0_6B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_0_6b_preset_numbers_and_defaults():
    cfg = Qwen3Config.from_preset("0.6B")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (151936, 1024, 3072, 28)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 8, 128)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e6 and cfg.max_position_embeddings == 40960
    assert cfg.num_experts == 0 and cfg.model_type == "qwen3"
    assert (cfg.bos_token_id, cfg.eos_token_id) == (151643, 151645)
    assert Qwen3Config() == cfg, "the dataclass defaults are Qwen3-0.6B"


def test_every_released_model_has_a_preset_and_a_repo():
    expected = {"0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B", "235B-A22B", "4B-Instruct-2507",
                "4B-Thinking-2507", "30B-A3B-Instruct-2507", "30B-A3B-Thinking-2507", "235B-A22B-Instruct-2507",
                "235B-A22B-Thinking-2507", "Coder-30B-A3B-Instruct", "Coder-480B-A35B-Instruct"}
    assert set(PRESETS) == expected and set(HF_REPOS) == expected
    assert HF_REPOS["0.6B"] == "Qwen/Qwen3-0.6B"
    assert HF_REPOS["Coder-480B-A35B-Instruct"] == "Qwen/Qwen3-Coder-480B-A35B-Instruct"
    for name in ("4B-Instruct-2507", "30B-A3B-Thinking-2507", "235B-A22B-Instruct-2507", "Coder-30B-A3B-Instruct"):
        assert Qwen3Config.from_preset(name).max_position_embeddings == 262_144, name
    assert Qwen3Config.from_preset("4B-Instruct-2507").rope_theta == 5e6
    assert Qwen3Config.from_preset("235B-A22B-Thinking-2507").rope_theta == 5e6
    assert Qwen3Config.from_preset("Coder-480B-A35B-Instruct").num_experts == 160


def test_preset_lookup_accepts_hub_ids_and_overrides():
    assert preset_name("Qwen/Qwen3-8B") == preset_name("qwen3-8b") == preset_name("8B") == "8B"
    assert Qwen3Config.from_preset("0.6B", num_hidden_layers=2).num_hidden_layers == 2
    assert PRESETS["0.6B"]["num_hidden_layers"] == 28, "overrides must not change the preset table"
    with pytest.raises(ValueError, match="unknown preset '7B'.*0.6B"):
        Qwen3Config.from_preset("7B")


def test_from_hf_reads_both_spellings(tmp_path):
    expected = Qwen3Config.from_preset("30B-A3B-Thinking-2507")
    for i, raw in enumerate((RELEASED_30B_2507, TF5_30B_2507)):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(raw))
        assert Qwen3Config.from_hf(folder) == expected  # the folder
        assert Qwen3Config.from_hf(folder / "config.json") == expected  # the file
        assert Qwen3Config.from_hf(str(folder)) == expected  # a str path
        assert Qwen3Config.from_hf(raw) == expected  # the dict
    assert Qwen3Config.from_hf(RELEASED_0_6B) == Qwen3Config.from_preset("0.6B")


def test_from_hf_reads_what_transformers_saves(tmp_path):
    from transformers import Qwen3Config as HFConfig, Qwen3MoeConfig
    for name in ("0.6B", "235B-A22B-Instruct-2507"):
        cfg = Qwen3Config.from_preset(name)
        (Qwen3MoeConfig if cfg.num_experts else HFConfig)(**cfg.to_hf()).save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert "rope_parameters" in saved and "rope_theta" not in saved, "transformers 5 spelling expected"
        assert Qwen3Config.from_hf(tmp_path / name) == cfg, name


def test_to_hf_round_trips_every_preset():
    for name in PRESETS:
        cfg = Qwen3Config.from_preset(name)
        d = cfg.to_hf()
        assert Qwen3Config.from_hf(json.loads(json.dumps(d))) == cfg, name
        assert d["architectures"] == ["Qwen3MoeForCausalLM" if cfg.num_experts else "Qwen3ForCausalLM"]
    assert "num_experts" not in Qwen3Config.from_preset("8B").to_hf(), "dense configs carry no MoE keys"


def test_missing_keys_take_the_reference_defaults():
    minimal = dict(model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    cfg = Qwen3Config.from_hf(minimal)
    assert not cfg.tie_word_embeddings and cfg.head_dim == 128 and cfg.rope_theta == 10_000.0
    moe = Qwen3Config.from_hf(dict(minimal, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                                   moe_intermediate_size=16, mlp_only_layers=None))
    assert moe.head_dim == 64 // 4, "transformers' Qwen3-MoE falls back to hidden_size // num_attention_heads"
    assert moe.mlp_only_layers == [] and not moe.norm_topk_prob


def test_refuses_other_model_types_naming_type_and_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(RELEASED_0_6B, model_type="qwen3_next")))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'qwen3_next' is not supported"):
        Qwen3Config.from_hf(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        Qwen3Config.from_hf(dict(RELEASED_0_6B, model_type="llama"))
    with pytest.raises(ValueError, match="model_type None"):
        Qwen3Config.from_hf({k: v for k, v in RELEASED_0_6B.items() if k != "model_type"})


@pytest.mark.parametrize("rope, name", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "linear"),
    ({"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e7, "factor": 4.0}}, "longrope"),
])
def test_refuses_rope_scaling_by_name(rope, name):  # YaRN is read (chapter 15, tests/test_long_context.py)
    with pytest.raises(ValueError, match=f"rope scaling '{name}' is not implemented"):
        Qwen3Config.from_hf(dict(RELEASED_30B_2507, **rope))


@pytest.mark.parametrize("change, match", [
    ({"num_key_value_heads": 5}, r"num_attention_heads \(32\) must be a multiple of num_key_value_heads \(5\)"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer"),
    ({"head_dim": 127}, "head_dim must be even"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
    ({"vocab_size": 1.5}, "vocab_size must be a positive integer"),
    ({"rope_theta": 0}, "rope_theta must be positive"),
    ({"num_experts_per_tok": 129}, r"num_experts_per_tok \(129\) must be between 1 and num_experts \(128\)"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size must be positive"),
    ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer"),
    ({"mlp_only_layers": [0, 48]}, r"mlp_only_layers \[48\]"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_refuses_impossible_values_naming_the_key(change, match, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(RELEASED_30B_2507, **change)))
    with pytest.raises(ValueError, match=match):
        Qwen3Config.from_hf(tmp_path)


def test_refuses_missing_required_keys():
    with pytest.raises(ValueError, match="missing key.*num_experts_per_tok"):
        Qwen3Config.from_hf({k: v for k, v in RELEASED_30B_2507.items() if k != "num_experts_per_tok"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Qwen3Config.from_hf("/nonexistent/folder")


def test_direct_construction_is_checked_too():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen3Config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="model_type"):
        Qwen3Config(model_type="llama")
    assert Qwen3Config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8).model_type == "qwen3_moe"


def test_moe_layer_rule():
    cfg = Qwen3Config(num_hidden_layers=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      decoder_sparse_step=2, mlp_only_layers=[5])
    assert [i for i in range(8) if cfg.is_moe_layer(i)] == [1, 3, 7]
    assert not any(Qwen3Config().is_moe_layer(i) for i in range(28))


# ---------------------------------------------------------------- hardening: JSON values of the wrong kind
@pytest.mark.parametrize("key", ["tie_word_embeddings", "norm_topk_prob"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_boolean_fields_must_be_json_booleans(key, value):
    """bool("false") is True: a string would silently tie (or renormalize) the wrong way."""
    with pytest.raises(ValueError, match=rf"{key} must be true or false \(a JSON boolean\), got {value!r}"):
        Qwen3Config(**{key: value})
    raw = dict(Qwen3Config().to_hf(), **{key: value})
    with pytest.raises(ValueError, match=rf"config dict: {key} must be true or false"):
        Qwen3Config.from_hf(raw)


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("value", [["linear", 2.0], "yarn", 4])
def test_rope_scaling_must_be_an_object(key, value):
    raw = dict(Qwen3Config().to_hf(), **{key: value})
    with pytest.raises(ValueError, match=rf"config dict: {key} must be an object \(or null\), got "):
        Qwen3Config.from_hf(raw)


def test_layer_types_of_the_wrong_length_are_refused_without_building_them():
    """A config claiming 10**12 layers next to a 3-entry layer_types is refused at once, in one short line."""
    raw = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 10**12, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
           "layer_types": ["full_attention"] * 3}
    with pytest.raises(ValueError, match=r"layer_types has 3 entries, but num_hidden_layers is 1,000,000,000,000") as e:
        Qwen3Config.from_hf(raw)
    assert len(str(e.value)) < 200
    raw.update(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match=r"layer_types\[1\] is 'sliding_attention', but .* make layer 1 'full_attention'"):
        Qwen3Config.from_hf(raw)
