"""QLoRA (chapter 14, section 11): chapter 13's LoRA on chapter 14's quantized layers. The kernels get a backward,
the adapters train while the stored bytes stay put, the adapter is PEFT's (it loads on transformers' Qwen3 holding
the dequantized weights, same logits), and merging refuses a quantized base until dequantize_model."""
import warnings

import pytest
import torch
from torch import nn

from hf_ref import tiny_hf_model
from qwen3_scratch import save_pretrained
from qwen3_scratch.hf_port import from_transformers
from qwen3_scratch.lora import (LoRAConfig, LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter,
                                trainable_parameters)
from qwen3_scratch.quant import (QuantLinear, dequantize_model, kernel_available, kernels_off, quantize_model,
                                 use_kernels)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def qlora_model(scheme="int4", r=4, seed=0, **quant):
    """A random tiny Qwen3 (transformers' init, then ours), quantized, with LoRA on every linear layer of the blocks
    and B randomized as if trained."""
    ours = from_transformers(tiny_hf_model(seed=seed, std=0.3))
    quantize_model(ours, scheme, group_size=32, **quant)
    apply_lora(ours, LoRAConfig(r=r, lora_alpha=2 * r))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ours.eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_path_has_a_backward_for_the_input(bits):
    if not kernel_available(bits):
        pytest.skip(f"this PyTorch has no int{bits} CPU kernel")
    layer = QuantLinear.from_weight(torch.randn(48, 64), bits, 32 if bits == 4 else None)
    assert layer.enable_kernel(True, torch.float32)
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad_out = torch.randn(3, 5, 48)
    (layer(x) * grad_out).sum().backward()
    assert layer.last_path.startswith("aten._weight_int")
    x_ref = x.detach().clone().requires_grad_(True)
    (nn.functional.linear(x_ref, layer.dequantize()) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert not any(b.requires_grad for b in layer.buffers()), "the stored weight gets no gradient"


def test_only_the_adapters_train_and_the_stored_bytes_stay_put():
    ours = qlora_model()
    assert all(isinstance(m.base_layer, QuantLinear) for m in ours.modules() if isinstance(m, LoRALinear))
    before = {n: b.clone() for n, b in ours.named_buffers() if b is not None}
    trainable = [p for p in ours.parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-2] in ("lora_A", "lora_B")
                             for n, p in ours.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ours.train()
    losses = []
    for _ in range(8):
        logits = ours(IDS)  # kernels on, as quantize_model left them
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(torch.equal(b, before[n]) for n, b in ours.named_buffers() if b is not None)


def test_counts_include_the_frozen_quantized_weights():
    float_model = from_transformers(tiny_hf_model(seed=0))
    apply_lora(float_model, LoRAConfig(r=4, lora_alpha=8))
    assert trainable_parameters(qlora_model()) == trainable_parameters(float_model)


@pytest.mark.parametrize("awq", [False, True])
def test_adapter_loads_in_peft_on_the_dequantized_base(tmp_path, awq):
    pre = None
    if awq:  # a pre_scale on one layer: dequantize_model must fold it back into the weight
        pre = {"layers.0.self_attn.q_proj": torch.linspace(0.5, 2.0, 64)}
    ours = qlora_model(pre_scales=pre)
    save_adapter(ours, tmp_path / "adapter")
    with torch.no_grad(), kernels_off(ours):
        logits = ours(IDS)  # dequantize path: fp32 throughout, as transformers will compute
    base = dequantize_model(qlora_model(pre_scales=pre))  # the same bytes, dequantized (the adapters come along)
    merged = merge_lora(base)  # now a float base: merging works
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), logits, rtol=0, atol=1e-4)
    plain = dequantize_model(quantize_model(from_transformers(tiny_hf_model(seed=0, std=0.3)), "int4", group_size=32,
                                            pre_scales=pre))
    save_pretrained(plain, tmp_path / "base")
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, attn_implementation="eager")
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, logits, rtol=0, atol=1e-4)


def test_merge_refuses_a_quantized_base_and_changes_nothing():
    ours = qlora_model()
    with torch.no_grad():
        before = ours(IDS)
    with pytest.raises(TypeError, match="cannot merge into a QuantLinear"):
        merge_lora(ours)
    assert all(not m.merged for m in ours.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), before, rtol=0, atol=0)


def test_a_float_adapter_loads_onto_the_quantized_model(tmp_path):
    float_model = from_transformers(tiny_hf_model(seed=0, std=0.3))
    apply_lora(float_model, LoRAConfig(r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"]))
    save_adapter(float_model, tmp_path / "adapter")
    q = quantize_model(from_transformers(tiny_hf_model(seed=0, std=0.3)), "int8")
    config = load_adapter(q, tmp_path / "adapter")
    assert config.r == 2
    wrapped = [n for n, m in q.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 6 and all(isinstance(q.get_submodule(n).base_layer, QuantLinear) for n in wrapped)
    assert use_kernels(q)  # still switchable


def test_dequantize_model_refuses_a_float_model():
    with pytest.raises(ValueError, match="not quantized"):
        dequantize_model(from_transformers(tiny_hf_model(seed=0)))
