"""LoRA (chapter 13): init, scaling, merge/unmerge, injection by name, and PEFT's adapter format both ways."""
import json
import math
import warnings

import pytest
import torch
from torch import nn

from hf_ref import tiny_hf_model
from qwen3_scratch import Qwen3Model, save_pretrained
from qwen3_scratch.hf_port import from_transformers
from qwen3_scratch.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, LoRALinear, adapter_key, apply_lora,
                                load_adapter, merge_lora, save_adapter, trainable_parameters, unmerge_lora)
from qwen3_scratch.checkpoint import CheckpointError

peft = pytest.importorskip("peft")


def tiny_pair(seed=0):
    """A random transformers Qwen3 (fp32, eager) and our model with the same weights."""
    hf = tiny_hf_model(seed=seed, std=0.3)  # logits of a few units, as a trained model's
    return hf, from_transformers(hf)


def randomize_b(model, seed=1, std=0.1):
    """B starts at zero (the adapter is a no-op): give it values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def test_init_is_identity_and_peft_like():
    torch.manual_seed(0)
    base = nn.Linear(32, 48, bias=True)
    layer = LoRALinear(base, r=4, alpha=12, dropout=0.1)
    layer.eval()  # no dropout
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), base(x))
    assert layer.scaling == 3.0
    assert LoRALinear(nn.Linear(32, 48), r=4, alpha=12, use_rslora=True).scaling == 6.0  # alpha / sqrt(r)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on (r, in) = U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > bound / 2


def test_bf16_base_keeps_fp32_adapter():
    layer = LoRALinear(nn.Linear(16, 16).bfloat16(), r=2, alpha=4)
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=2, alpha=4, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "dropout makes two training passes differ"
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Embedding(4, 4), r=1, alpha=1)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRAConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="target_modules is empty"):
        LoRAConfig(target_modules=[])


def test_merge_unmerge_exact():
    _, model = tiny_pair()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8))
    randomize_b(model)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model, unload=False)
        assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
        merged = model(IDS)
        unmerge_lora(model)
        back = model(IDS)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5)
    torch.testing.assert_close(back, adapted, rtol=0, atol=1e-5)
    # every weight is back to within one fp32 rounding of the original
    for name, p in model.named_parameters():
        orig = w0[name.replace(".base_layer", "")] if ".lora_" not in name else None
        if orig is not None:
            assert (p - orig).abs().max() <= orig.abs().max() * 2.0 ** -23, name
    with pytest.raises(RuntimeError, match="not merged"):
        next(m for m in model.modules() if isinstance(m, LoRALinear)).unmerge()


def test_merge_unload_gives_plain_model():
    _, model = tiny_pair()
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["o_proj", "up_proj"]))
    randomize_b(model)
    with torch.no_grad():
        adapted = model(IDS)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert not hasattr(model, "lora_config")
        torch.testing.assert_close(model(IDS), adapted, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(Qwen3Model(model.config).state_dict()), "checkpoint names unchanged"
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(model)


def test_injection_by_name_and_counts():
    _, model = tiny_pair()
    total = sum(p.numel() for p in model.parameters())
    names = apply_lora(model, LoRAConfig(r=3, lora_alpha=6, target_modules=["k_proj", "down_proj"]))
    L, D, I, K, Dh = 3, 64, 128, 2, 16
    assert names == [n for i in range(L) for n in (f"layers.{i}.self_attn.k_proj", f"layers.{i}.mlp.down_proj")]
    counts = trainable_parameters(model)
    assert counts["trainable"] == L * 3 * ((D + K * Dh) + (I + D))
    assert counts["total"] == total + counts["trainable"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())


def test_regex_targets_and_errors():
    _, model = tiny_pair()
    names = apply_lora(model, LoRAConfig(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    assert names == ["layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    _, model = tiny_pair()
    with pytest.raises(ValueError, match="matches no linear layer.*q_proj"):
        apply_lora(model, LoRAConfig(target_modules=["qproj"]))
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, LoRAConfig(target_modules=["lm_head"]))
    assert all(p.requires_grad for p in model.parameters()), "a refused injection changes nothing"


def test_only_adapters_train():
    _, model = tiny_pair()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, LoRAConfig(r=2, lora_alpha=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(IDS).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n
    assert any(torch.count_nonzero(m.lora_B.weight) for m in model.modules() if isinstance(m, LoRALinear))


def _peft_wrap(hf, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(hf, peft.LoraConfig(**kw))


@pytest.mark.parametrize("kw", [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                                dict(r=3, lora_alpha=7, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj",
                                                                        "down_proj"], use_rslora=True)])
def test_forward_equals_peft(kw):
    """Same base weights, same A and B: our adapted model's logits equal PEFT's on transformers' Qwen3."""
    hf, ours = tiny_pair()
    pm = _peft_wrap(hf, **kw).eval()
    apply_lora(ours, LoRAConfig(**kw))
    ours.eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        peft_state = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if ".lora_" in k}
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_A.weight.copy_(peft_state[adapter_key(name, "A")])
                layer.lora_B.weight.copy_(peft_state[adapter_key(name, "B")])
        ref = pm(IDS).logits
        got = ours(IDS)
    assert ref.abs().max() > 1, "logits of a useful size"
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert trainable_parameters(ours)["trainable"] == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def test_saved_adapter_loads_in_peft(tmp_path):
    hf, ours = tiny_pair()
    save_pretrained(ours, tmp_path / "base")
    apply_lora(ours, LoRAConfig(r=4, lora_alpha=16, lora_dropout=0.1))
    randomize_b(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32,
                                                    attn_implementation="eager")
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert pm.peft_config["default"].r == 4 and pm.peft_config["default"].lora_dropout == 0.1
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), pm(IDS).logits, rtol=0, atol=1e-5)


def test_peft_adapter_loads_in_ours(tmp_path):
    hf, ours = tiny_pair()
    pm = _peft_wrap(hf, r=2, lora_alpha=5, target_modules=["v_proj", "gate_proj"]).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path)
    cfg = load_adapter(ours, tmp_path)
    assert cfg.r == 2 and cfg.lora_alpha == 5 and cfg.target_modules == ["gate_proj", "v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS), pm(IDS).logits, rtol=0, atol=1e-5)


def test_save_load_roundtrip_and_strictness(tmp_path):
    _, ours = tiny_pair()
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    apply_lora(ours, LoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    randomize_b(ours)
    save_adapter(ours, tmp_path / "a")

    def fresh():
        m = Qwen3Model(ours.config)
        m.load_state_dict(base_state)
        return m.eval()

    m = fresh()
    load_adapter(m, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(m(IDS), ours.eval()(IDS))

    # a file with a wrong shape is refused before the model changes
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "a" / ADAPTER_WEIGHTS)
    key = adapter_key("layers.0.self_attn.q_proj", "B")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / ADAPTER_CONFIG).write_text((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    save_file({**tensors, key: torch.zeros(3, 2)}, tmp_path / "b" / ADAPTER_WEIGHTS)
    m = fresh()
    with pytest.raises(CheckpointError, match=r"shape mismatch.*layers\.0\.self_attn\.q_proj\.lora_B"):
        load_adapter(m, tmp_path / "b")
    assert not any(isinstance(x, LoRALinear) for x in m.modules()), "nothing half-done"
    # a missing tensor
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "b" / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_adapter(fresh(), tmp_path / "b")
    # features we do not implement
    cfg = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "b" / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora=True"):
        load_adapter(fresh(), tmp_path / "b")
    (tmp_path / "b" / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(CheckpointError, match="'IA3' is not supported"):
        load_adapter(fresh(), tmp_path / "b")
    with pytest.raises(CheckpointError, match="adapter_config.json not found"):
        load_adapter(fresh(), tmp_path / "nowhere")
