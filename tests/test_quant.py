"""Chapter 14's weight-only quantization: packing, int8/int4 layers against the dequantized reference, the PyTorch
kernel path against the reference path, save/reload, load_pretrained(quantize=...), the CLI flag, clear errors.
No timed assertions."""
import io
import json

import pytest
import torch
from torch import nn

from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.quant import (check_scheme, dequantize_int4, dequantize_int8, GROUP_SIZES, kernel_available,
                                 kernel_report, load_quantized, model_bytes, pack_int4, QuantEmbedding,
                                 quantize_int4, quantize_int8, quantize_model, QuantLinear, save_quantized,
                                 unpack_int4, use_kernels)
from qwen3_scratch.awq import awq_search, output_error
from qwen3_scratch.lab.quant_bench import logits_kl, random_float_model, shared_copy
from qwen3_scratch.checkpoint import CheckpointError
from qwen3_scratch.weights import load_pretrained, save_pretrained


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread


def tiny(**kw):
    return Qwen3Config(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16), **kw})


@pytest.fixture(scope="module")
def model():
    return random_float_model(tiny(), seed=0)


IDS = torch.randint(256, (2, 9), generator=torch.Generator().manual_seed(0))


def test_pack_unpack_exact_and_layout():
    codes = torch.randint(0, 16, (7, 3, 12), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (7, 3, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    assert pack_int4(torch.tensor([[1, 15, 0, 2]], dtype=torch.uint8)).tolist() == [[1 + 15 * 16, 0 + 2 * 16]]
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


def test_int8_round_trip_within_half_a_step():
    w = torch.randn(33, 70) * torch.logspace(-3, 1, 33)[:, None]  # rows of very different sizes
    w[5] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (33,) and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(q[5], torch.zeros(70, dtype=torch.int8))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_round_trip_within_half_a_step(group_size):
    w = torch.randn(16, 256) + torch.linspace(-2, 2, 256)  # groups with an offset: the zero point matters
    packed, scale, zero = quantize_int4(w, group_size)
    assert packed.shape == (16, 128) and scale.shape == zero.shape == (16, 256 // group_size)
    err = (dequantize_int4(packed, scale, zero) - w).abs()
    assert (err <= scale.repeat_interleave(group_size, 1) / 2 + 1e-5).all()
    # rows can be dequantized on their own (the embedding does)
    assert torch.equal(dequantize_int4(packed[3:5], scale[3:5], zero[3:5]), dequantize_int4(packed, scale, zero)[3:5])


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 64), (4, 128)])
def test_quant_linear_reference_and_kernel_paths(bits, group_size):
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    layer = QuantLinear.from_weight(weight, bits, group_size)
    x = torch.randn(2, 3, 256)
    ref = x @ layer.dequantize().T  # the dequantized reference
    out = layer(x)
    assert out.shape == (2, 3, 96) and torch.allclose(out, ref, atol=1e-5) and layer.last_path.startswith("dequant")
    if not kernel_available(bits):
        pytest.skip(f"this torch has no CPU int{bits} weight-only kernel")
    assert layer.enable_kernel(compute_dtype=torch.float32)
    assert torch.allclose(layer(x), ref, atol=1e-4, rtol=1e-4), "fp32 kernel must equal the reference"
    assert layer.last_path.startswith("aten._weight_int")
    assert layer.enable_kernel(compute_dtype=torch.bfloat16)
    assert (layer(x) - ref).abs().max() < 0.02 * ref.abs().max(), "bf16 kernel within bf16 rounding"


def test_int4_kernel_needs_out_features_multiple_of_16():
    layer = QuantLinear.from_weight(torch.randn(24, 64), 4, 32)
    assert not layer.enable_kernel()  # 24 % 16 != 0: falls back, and says so
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ layer.dequantize().T, atol=1e-5) and layer.last_path.startswith("dequant")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_model_close_to_float_and_tied(model, scheme):
    with torch.no_grad():
        ref = model(IDS)
        q = quantize_model(shared_copy(model), scheme, group_size=32)
        out = q(IDS)
    assert logits_kl(ref, out) < (1e-3 if scheme == "int8" else 3e-2)
    assert model.lm_head.weight is model.embed_tokens.weight  # the float model is untouched
    assert q.lm_head.qweight is q.embed_tokens.qweight, "tied embeddings share one quantized matrix"
    assert model_bytes(q) < model_bytes(model) / (3.5 if scheme == "int8" else 5)
    paths = kernel_report(q)
    assert sum(paths.values()) == 2 * 7 + 1
    if kernel_available(4 if scheme == "int4" else 8):
        assert all(p.startswith("aten._weight_int") for p in paths), paths
    use_kernels(q, False)
    with torch.no_grad():
        assert (q(IDS) - out).abs().max() < 0.05 * out.abs().max(), "kernel and reference paths agree"
    assert set(kernel_report(q)) == {"dequantize + F.linear"}


def test_untied_model_and_bf16():
    m = random_float_model(tiny(tie_word_embeddings=False), seed=1)
    q = quantize_model(shared_copy(m, torch.bfloat16), "int8")
    assert q.lm_head.qweight is not q.embed_tokens.qweight
    with torch.no_grad():
        out = q(IDS)
    assert out.dtype == torch.bfloat16 and logits_kl(m(IDS), out) < 1e-2


def test_save_reload_equal(model, tmp_path):
    torch.manual_seed(0)
    calib = [torch.randint(256, (1, 32))]
    from qwen3_scratch.awq import awq_scales
    scales, _ = awq_scales(model, calib, group_size=32)
    for scheme, pre in (("int8", None), ("int4", scales)):
        q = quantize_model(shared_copy(model), scheme, 32, pre_scales=pre)
        d = save_quantized(q, tmp_path / scheme)
        config = json.loads((d / "config.json").read_text())
        assert config["quantization_config"]["scheme"] == scheme
        from safetensors import safe_open
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert not any(n.startswith("lm_head.") for n in names), "tied: the shared matrix is stored once"
        assert any(n.endswith(".pre_scale") for n in names) == (pre is not None)
        for again in (load_quantized(d, device="cpu"), load_pretrained(d, device="cpu")):
            assert again.lm_head.qweight is again.embed_tokens.qweight
            with torch.no_grad():
                assert torch.equal(again(IDS), q(IDS)), f"{scheme}: reloaded model differs"
            for name, t in q.state_dict().items():
                assert torch.equal(again.state_dict()[name], t), name


def test_load_pretrained_quantize(model, tmp_path):
    save_pretrained(model, tmp_path)
    q = load_pretrained(tmp_path, device="cpu", quantize="int4", group_size=64)
    assert q.quantization == {"scheme": "int4", "group_size": 64, "awq": False}
    with torch.no_grad():
        assert logits_kl(model(IDS), q(IDS)) < 3e-2
    with pytest.raises(ValueError, match="quantize='int3'"):
        load_pretrained(tmp_path, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="group_size=48"):
        load_pretrained(tmp_path, device="cpu", quantize="int4", group_size=48)


def test_bad_arguments_are_refused_before_changing_anything(model, tmp_path):
    with pytest.raises(ValueError, match="choose one of int8, int4"):
        check_scheme("fp8")
    m = random_float_model(tiny(intermediate_size=96), seed=0)  # down_proj's K = 96 is not a multiple of 64
    with pytest.raises(ValueError, match=r"down_proj \(in_features=96\)"):
        quantize_model(m, "int4", group_size=64)
    assert isinstance(m.layers[0].self_attn.q_proj, nn.Linear), "nothing was replaced"
    q = quantize_model(shared_copy(model), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "int4")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(model, tmp_path / "x")
    with pytest.raises(ValueError, match="pre_scales for layers that are not quantized: nope"):
        quantize_model(shared_copy(model), "int4", 32, pre_scales={"nope": torch.ones(64)})


def test_reload_checks_the_header(model, tmp_path):
    d = save_quantized(quantize_model(shared_copy(model), "int4", 32), tmp_path / "q")
    from safetensors.torch import load_file, save_file
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.qweight"] = tensors["model.layers.0.mlp.up_proj.qweight"].to(torch.int8)
    del tensors["model.norm.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing model\.norm\.weight.*up_proj\.qweight: I8"):
        load_quantized(d, device="cpu")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["scheme"] = "int2"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="int2"):
        load_quantized(d, device="cpu")
    with pytest.raises(ValueError, match="holds a int4 checkpoint"):
        config["quantization_config"]["scheme"] = "int4"
        (d / "config.json").write_text(json.dumps(config))
        load_pretrained(d, device="cpu", quantize="int8")


@pytest.mark.parametrize("scheme,name,value", [("int8", "model.layers.1.self_attn.q_proj.scale", "nan"),
                                               ("int4", "model.layers.0.mlp.up_proj.zero", "inf"),
                                               ("int4", "model.layers.1.mlp.down_proj.scale", "nan")])
def test_non_finite_quantization_parameters_warn(model, tmp_path, scheme, name, value):
    """A NaN scale or an inf zero makes every output NaN: loading says so, naming the tensor, as for float weights."""
    d = save_quantized(quantize_model(shared_copy(model), scheme, 32), tmp_path / scheme)
    from safetensors.torch import load_file, save_file
    tensors = load_file(d / "model.safetensors")
    tensors[name].view(-1)[0] = float(value)
    save_file(tensors, d / "model.safetensors")
    for load in (load_quantized, load_pretrained):
        with pytest.warns(UserWarning, match=f"{name} holds 1 {'NaN' if value == 'nan' else 'inf'}"):
            load(d, device="cpu")


def test_group_size_must_be_an_integer(model):
    for bad in (64.0, True, "64"):
        with pytest.raises(ValueError, match="group_size"):
            quantize_model(shared_copy(model), "int4", group_size=bad)
        with pytest.raises(ValueError, match="group_size"):
            check_scheme("int4", bad)


def test_quant_embedding_lookups_equal_dequantized_rows():
    head = QuantLinear.from_weight(torch.randn(48, 64), 8)
    emb = QuantEmbedding(head)
    ids = torch.tensor([[0, 47, 3]])
    assert torch.equal(emb(ids), head.dequantize()[ids])


def test_awq_helps_with_loud_input_channels():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 30
    plain = output_error(w, x, QuantLinear.from_weight(w, 4, 64))
    pre, alpha, err = awq_search(w, x, 64)
    assert alpha > 0 and err < plain and pre.shape == (128,)


def test_cli_quantize_flag(model, tmp_path, capsys):
    from qwen3_scratch.cli import build_parser, main
    args = build_parser().parse_args(["generate", "--model", "x", "--prompt", "hi", "--quantize", "int8"])
    assert args.quantize == "int8"
    assert main(["generate", "--model", "x", "--prompt", "hi", "--quantize", "int3"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    cfg = tiny(vocab_size=151_936)  # the real vocabulary, so the bundled tokenizer fits
    save_pretrained(random_float_model(cfg), tmp_path)
    out = io.StringIO()
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hello", "--max-new-tokens", "3",
                 "--quantize", "int4", "--device", "cpu"], stdout=out) == 0
    assert out.getvalue().strip(), "prints the continuation"


def test_bench_quick_runs(tmp_path, monkeypatch):
    from qwen3_scratch.lab import quant_bench as quant
    monkeypatch.setitem(quant.SETTINGS, "quick", dict(preset=None, context=4, warmup=0, repeats=1, kl_tokens=8,
                                                      val_tokens=512, layer_val_tokens=512))
    monkeypatch.setattr(quant, "shipped_model_data", lambda *a, **k: None)  # the trained model: in the notebook
    monkeypatch.setattr("qwen3_scratch.lab.bench.SMALL", dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                          num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, head_dim=16))
    res = quant.main(["--quick", "--out", str(tmp_path), "--no-figures"])
    names = [r["variant"] for r in res["random_model"]]
    assert names[:5] == ["fp32", "bf16", "int8 (dequantize on the fly)", "int8", "int4 g64"]
    assert (tmp_path / "quant_cpu_quick.json").is_file()
    assert res["random_model"][0]["speedup_vs_fp32"] == 1.0
