"""Tests for chapter 21: qwen3_scratch.flash_attention (online softmax, the tiled forward and its backward,
flash-decoding), qwen3_scratch.triton_attention (the kernels under Triton's interpreter on CPU tensors) and the model's
attn_implementation switch; qwen3_scratch.flash_bench's memory counter. References: chapter 04's attention_eager and
PyTorch's SDPA."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qwen3_scratch.attention import ATTENTION_FUNCTIONS, attention_eager, attention_sdpa, causal_mask
from qwen3_scratch.flash_attention import (combine_partials, flash_attention, flash_attention_backward,
                                           flash_attention_forward, flash_decode, online_softmax)
from qwen3_scratch.lab.flash_bench import attention_traffic, memory_sweep, peak_bytes
from qwen3_scratch.generate import generate
from qwen3_scratch.model import Qwen3Model, build_mask
from qwen3_scratch.triton_attention import triton_flash_attention, triton_flash_decode, triton_unavailable
from qwen3_scratch.utils import package_dir
from qwen3_scratch.weights import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = package_dir() / "data" / "shakespeare" / "model"
TRITON = triton_unavailable("cpu")
needs_triton = pytest.mark.skipif(TRITON is not None, reason=f"Triton kernels cannot run here: {TRITON}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def qkv(B, H, K, T, S, Dh=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, L, Dh, generator=g).to(dtype) for n, L in ((H, T), (K, S), (K, S)))


def random_mask(B, T, S, seed=0, p=0.5):
    m = torch.rand(B, 1, T, S, generator=torch.Generator().manual_seed(seed)) > p
    m[..., 0] = True  # every query may see a key
    return m


# ---- online softmax

@pytest.mark.parametrize("seed", range(5))
def test_online_softmax_equals_softmax_for_random_block_splits(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 61, generator=g) * 4
    x[0] = float("-inf")  # sees nothing
    x[1, :40] = float("-inf")  # the first blocks are all -inf, later ones are not: the NaN trap
    x[2, ::2] = float("-inf")
    want = torch.softmax(x, -1).nan_to_num(0.0)
    for _ in range(10):
        cuts = sorted((torch.randperm(60, generator=g)[:int(torch.randint(0, 12, (1,), generator=g))] + 1).tolist())
        widths = [b - a for a, b in zip([0] + cuts, cuts + [61])]
        p, m, l = online_softmax(x, widths)
        assert not p.isnan().any(), widths
        assert torch.allclose(p, want, atol=1e-6), widths
        assert torch.equal(m, x.amax(-1))
        finite = torch.isfinite(m)
        assert torch.allclose(l[finite], torch.exp(x[finite] - m[finite, None]).sum(-1), rtol=1e-5)
    assert torch.all(p[0] == 0) and l[0] == 0


def test_online_softmax_rejects_blocks_that_miss_columns():
    with pytest.raises(ValueError, match="cover the 10 columns"):
        online_softmax(torch.randn(2, 10), [3, 3])
    with pytest.raises(ValueError, match="positive"):
        online_softmax(torch.randn(2, 10), [0, 10])


# ---- the tiled forward

SHAPES = [  # B, H, K, T, S, block_q, block_k: MHA, GQA, MQA, odd lengths, T < S (cached keys), T = 1
    (2, 4, 4, 37, 37, 16, 16), (2, 8, 2, 50, 50, 16, 32), (1, 4, 1, 33, 33, 64, 64), (2, 8, 2, 7, 45, 4, 16),
    (1, 6, 3, 1, 29, 16, 8), (1, 2, 1, 100, 100, 32, 7)]


@pytest.mark.parametrize("B, H, K, T, S, bq, bk", SHAPES)
def test_tiled_forward_equals_eager_and_sdpa_causal(B, H, K, T, S, bq, bk):
    q, k, v = qkv(B, H, K, T, S, seed=T)
    out, lse = flash_attention_forward(q, k, v, None, bq, bk)
    want, _ = attention_eager(q, k, v)
    assert (out - want).abs().max() < 1e-5
    assert (out - attention_sdpa(q, k, v)).abs().max() < 1e-5
    scores = (q @ k.repeat_interleave(H // K, 1).transpose(-1, -2) / 4.0).masked_fill(~causal_mask(T, S), float("-inf"))
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)


@pytest.mark.parametrize("kind", ["random", "padding", "window", "2d"])
def test_tiled_forward_takes_the_models_masks(kind):
    q, k, v = qkv(2, 8, 2, 40, 40, seed=1)
    attn = torch.ones(2, 40, dtype=torch.long)
    attn[1, :11] = 0
    mask = {"random": random_mask(2, 40, 40), "padding": build_mask(40, 0, attn),
            "window": build_mask(40, 0, window=9), "2d": causal_mask(40)}[kind]
    out, _ = flash_attention_forward(q, k, v, mask, 16, 16)
    assert (out - attention_eager(q, k, v, mask)[0]).abs().max() < 1e-5


def test_rows_that_see_no_key_give_zeros_not_nan():
    q, k, v = qkv(1, 2, 1, 8, 8)
    mask = causal_mask(8)[None, None].clone()
    mask[..., 3, :] = False
    out, lse = flash_attention_forward(q, k, v, mask, 4, 4)
    assert torch.all(out[:, :, 3] == 0) and torch.all(lse[:, :, 3] == float("-inf")) and not out.isnan().any()


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_tiled_forward_low_precision_as_accurate_as_sdpa(dtype, tol):
    q, k, v = qkv(1, 8, 2, 70, 70, Dh=64, seed=2)
    exact, _ = attention_eager(q.double(), k.double(), v.double())
    low = [t.to(dtype) for t in (q, k, v)]
    out, _ = flash_attention_forward(*low, None, 32, 32)
    assert out.dtype == dtype
    err, err_sdpa = ((x.double() - exact).abs().max().item() for x in (out, attention_sdpa(*low)))
    assert err < tol and err <= 2 * err_sdpa + 1e-3, (err, err_sdpa)


class _Ops(TorchDispatchMode):
    """Records every aten op's name, and the elements each clone (a copy made by reshape) copies."""

    def __init__(self):
        super().__init__()
        self.names, self.cloned = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        if self.names[-1] == "clone":
            self.cloned += args[0].numel()
        return func(*args, **(kwargs or {}))


def test_causal_tiles_past_the_diagonal_are_skipped():
    q, k, v = qkv(1, 2, 1, 64, 64)
    with _Ops() as ops:
        flash_attention_forward(q, k, v, None, 8, 8)
    tiles = ops.names.count("bmm") // 2  # two products per tile: q k^T and p v
    assert tiles == 8 * 9 // 2, f"{tiles} tiles computed; the causal triangle of 8 x 8 tiles has 36"


def test_gqa_never_copies_keys_or_values():
    q = torch.randn(1, 64, 16, 8).transpose(1, 2)  # (B, H, T, Dh) laid out as the layer makes it
    k, v = torch.randn(2, 1, 2, 80, 8).unbind(0)  # (B, K, max_len, Dh) cache buffers
    with _Ops() as ops:
        flash_attention_forward(q, k[:, :, :64], v[:, :, :64], None, 16, 16)
    assert "repeat_interleave" not in ops.names and "expand_copy" not in ops.names
    assert ops.cloned == q.numel(), f"only the q tiles may be copied (each element once), {ops.cloned} elements were"


def test_bad_inputs_get_one_line_errors():
    q, k, v = qkv(1, 6, 4, 3, 3)
    with pytest.raises(ValueError, match="H a multiple of K"):
        flash_attention_forward(q, k, v)
    q, k, v = qkv(1, 4, 2, 5, 3)
    with pytest.raises(ValueError, match="T=5, S=3"):
        flash_attention_forward(q, k, v)
    q, k, v = qkv(1, 4, 2, 3, 3)
    with pytest.raises(ValueError, match=r"bool mask .*\(3, 3\)"):
        flash_attention_forward(q, k, v, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="one floating-point dtype"):
        flash_attention_forward(q, k.half(), v)
    with pytest.raises(ValueError, match="block sizes"):
        flash_attention_forward(q, k, v, None, 0, 4)
    with pytest.raises(ValueError, match="T = 1"):
        flash_decode(q, k, v)


# ---- the backward

@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_backward_passes_gradcheck(masked):
    q, k, v = (t.double().requires_grad_() for t in qkv(1, 4, 2, 6, 8, Dh=4, seed=3))  # G = 2, 2 x 2 tiles
    mask = random_mask(1, 6, 8, seed=3, p=0.4) if masked else None
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attention(q, k, v, mask, 4, 5), (q, k, v))


def test_backward_equals_autograd_through_eager_in_fp32():
    q, k, v = (t.requires_grad_() for t in qkv(2, 8, 2, 30, 41, Dh=32, seed=4))
    mask = random_mask(2, 30, 41, seed=4)
    dout = torch.randn(2, 8, 30, 32)
    for m in (None, mask):
        got = torch.autograd.grad(flash_attention(q, k, v, m, 8, 16), (q, k, v), dout)
        want = torch.autograd.grad(attention_eager(q, k, v, m)[0], (q, k, v), dout)
        for a, b in zip(got, want):
            assert (a - b).abs().max() < 2e-5


def test_backward_function_alone_matches_and_rows_without_keys_get_no_gradient():
    q, k, v = qkv(1, 2, 1, 6, 6, seed=5)
    mask = causal_mask(6)[None, None].clone()
    mask[..., 2, :] = False
    out, lse = flash_attention_forward(q, k, v, mask, 4, 4)
    dq, dk, dv = flash_attention_backward(torch.ones_like(out), q, k, v, out, lse, mask, 4, 4)
    assert torch.all(dq[:, :, 2] == 0) and not any(t.isnan().any() for t in (dq, dk, dv))


# ---- flash-decoding

@pytest.mark.parametrize("split", [1, 5, 64, 300, 1000])
def test_flash_decode_equals_eager(split):
    q, k, v = qkv(2, 8, 2, 1, 300, Dh=32, seed=6)
    mask = random_mask(2, 1, 300, seed=6)
    mask[..., :100] = False  # whole splits hidden: they must weigh nothing
    mask[..., 0] = True
    assert (flash_decode(q, k, v, split=split) - attention_eager(q, k, v)[0]).abs().max() < 1e-5
    assert (flash_decode(q, k, v, mask, split) - attention_eager(q, k, v, mask)[0]).abs().max() < 1e-5


def test_combine_partials_of_disjoint_keys_is_exact_and_empty_parts_weigh_nothing():
    q, k, v = qkv(1, 4, 4, 1, 50, seed=7)
    parts = [(0, 17), (17, 18), (18, 50)]
    outs = [attention_eager(q, k[:, :, a:b], v[:, :, a:b])[0] for a, b in parts]
    lses = [torch.logsumexp(q @ k[:, :, a:b].transpose(-1, -2) / 4.0, -1) for a, b in parts]
    outs.append(torch.zeros_like(outs[0]))  # a split that saw no key
    lses.append(torch.full_like(lses[0], float("-inf")))
    out, lse = combine_partials(torch.stack(outs, -2), torch.stack(lses, -1))
    assert (out - attention_eager(q, k, v)[0]).abs().max() < 1e-6
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 4.0, -1), atol=1e-6)
    nothing, lse0 = combine_partials(torch.zeros(2, 3, 4), torch.full((2, 3), float("-inf")))
    assert torch.all(nothing == 0) and torch.all(lse0 == float("-inf"))


# ---- Triton kernels, under the interpreter on CPU tensors

@needs_triton
@pytest.mark.parametrize("B, H, K, T, S, Dh, bm, bn", [
    (2, 8, 2, 37, 37, 64, 16, 16), (1, 4, 1, 20, 45, 128, 16, 32), (1, 4, 4, 33, 33, 64, 64, 64),
    (1, 2, 2, 3, 70, 16, 16, 16)])
def test_triton_forward_equals_pytorch_version(B, H, K, T, S, Dh, bm, bn):
    q, k, v = qkv(B, H, K, T, S, Dh=Dh, seed=T)
    out, lse = triton_flash_attention(q, k, v, block_m=bm, block_n=bn)
    want, want_lse = flash_attention_forward(q, k, v)
    assert (out - want).abs().max() < 1e-5 and (lse - want_lse).abs().max() < 1e-5


@needs_triton
def test_triton_forward_takes_masks_and_strided_views():
    q = torch.randn(2, 29, 4, 64).transpose(1, 2)  # (B, H, T, Dh) as the layer makes it: not contiguous
    cache = torch.randn(2, 2, 2, 48, 64)  # k and v: slices of bigger cache buffers
    k, v = cache[0, :, :, :29], cache[1, :, :, :29]
    attn = torch.ones(2, 29, dtype=torch.long)
    attn[0, :6] = 0
    for mask in (build_mask(29, 0, attn), build_mask(29, 0, window=8), random_mask(1, 29, 29)):
        out, _ = triton_flash_attention(q, k, v, mask, block_m=16, block_n=16)
        assert (out - attention_eager(q, k, v, mask)[0]).abs().max() < 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_forward_low_precision(dtype):
    q, k, v = qkv(1, 4, 2, 40, 40, Dh=64, seed=8)
    exact, _ = attention_eager(q.double(), k.double(), v.double())
    low = [t.to(dtype) for t in (q, k, v)]
    out, _ = triton_flash_attention(*low, block_m=16, block_n=32)
    assert out.dtype == dtype
    err, err_sdpa = ((x.double() - exact).abs().max().item() for x in (out, attention_sdpa(*low)))
    assert err <= 2 * err_sdpa + 1e-3, (err, err_sdpa)


@needs_triton
@pytest.mark.parametrize("split, masked, dtype", [(16, False, torch.float32), (37, True, torch.float32),
                                                  (8, True, torch.float32), (16, False, torch.bfloat16)])
def test_triton_flash_decoding_equals_pytorch_version(split, masked, dtype):
    q, k, v = (t.to(dtype) for t in qkv(2, 8, 2, 1, 37, Dh=64, seed=9))
    mask = random_mask(2, 1, 37, seed=9) if masked else None
    out = triton_flash_decode(q, k, v, mask, split=split, block_n=16)
    want = flash_decode(q.float(), k.float(), v.float(), mask)
    assert out.dtype == dtype and (out.float() - want).abs().max() < (1e-5 if dtype == torch.float32 else 2e-2)


@needs_triton
def test_triton_refuses_what_it_cannot_take():
    q, k, v = qkv(1, 2, 1, 4, 4, Dh=48)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        triton_flash_attention(q, k, v)
    q, k, v = qkv(1, 2, 1, 4, 4, Dh=16)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        triton_flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="use 'flash' .* to train"):
        triton_flash_attention(q.requires_grad_(), k, v)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        triton_flash_attention(q.detach(), k, v, block_m=24)


def test_triton_unavailable_says_what_to_use_instead(monkeypatch):
    assert "not on mps; use 'flash' or 'sdpa'" in triton_unavailable("mps")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    why = triton_unavailable()
    assert "pip install triton==3.7.1" in why and "use 'flash'" in why
    with pytest.raises(ValueError, match=r"attn_implementation='triton' cannot run here: the triton package is not"):
        load_pretrained(SHIPPED, device="cpu", attn_implementation="triton")


# ---- the model switch, on the shipped model

@pytest.fixture(scope="module")
def bard_inputs():
    ids = torch.tensor([[5, 17, 300, 42, 9, 77, 1000, 3, 18, 250, 11, 64], [0, 0, 0, 0, 7, 8, 90, 4, 33, 2, 101, 57]])
    attn = (ids != 0).long()  # row 1 is left-padded with 4 tokens
    model = load_pretrained(SHIPPED, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        logits = model(ids, attention_mask=attn)
    return ids, attn, logits, generate(model, ids, 6, attention_mask=attn)


@pytest.mark.parametrize("impl", ["eager", "flash", pytest.param("triton", marks=needs_triton)])
def test_model_switch_gives_the_defaults_logits_and_greedy_tokens(bard_inputs, impl):
    ids, attn, want_logits, want_tokens = bard_inputs
    model = load_pretrained(SHIPPED, device="cpu", dtype=torch.float32, attn_implementation=impl)
    assert model.attn_implementation == impl and all(l.self_attn.attn_implementation == impl for l in model.layers)
    with torch.no_grad():
        assert (model(ids, attention_mask=attn) - want_logits).abs().max() < 1e-4  # prefill
    assert torch.equal(generate(model, ids, 6, attention_mask=attn), want_tokens)  # prefill + cached decoding


def test_model_switch_rejects_unknown_names_before_reading_anything(tmp_path):
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' is unknown: use one of 'eager', "
                                         r"'sdpa', 'flash', 'triton'$"):
        load_pretrained(tmp_path / "no-such-checkpoint", attn_implementation="flash_attention_2")
    model = Qwen3Model(load_pretrained(SHIPPED, device="cpu").config)
    with pytest.raises(ValueError, match="unknown"):
        model.set_attn_implementation("fast")
    assert model.set_attn_implementation("flash") is model and model.attn_implementation == "flash"


def test_registry_knows_every_name():
    assert list(ATTENTION_FUNCTIONS) == ["eager", "sdpa", "flash", "triton"]


def test_package_imports_and_runs_flash_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"  # `import triton` now fails, as where it is not installed
            "import torch, qwen3_scratch\n"
            "from qwen3_scratch.model import Qwen3Model\nfrom qwen3_scratch.config import Qwen3Config\n"
            "cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, "
            "num_attention_heads=4, num_key_value_heads=2, head_dim=16)\n"
            "m = Qwen3Model(cfg, attn_implementation='flash').eval()\n"
            "print(m(torch.tensor([[1, 2, 3]])).shape)\n"
            "try:\n    m.set_attn_implementation('triton')\nexcept ValueError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch.Size([1, 3, 64])" in done.stdout and "pip install triton" in done.stdout, done.stdout


# ---- the memory experiment

def test_peak_memory_counts_what_is_alive_at_once():
    def f():
        a = torch.empty(1000)
        b = a + 1
        del a
        return b * 2
    assert peak_bytes(f) == 8000
    x = torch.randn(100)
    assert peak_bytes(lambda: x.view(10, 10).t()) == 0


def test_memory_grows_quadratically_naive_and_linearly_tiled():
    rows = memory_sweep([256, 512, 1024], block=64)
    naive = [r["naive"] for r in rows]
    tiled = [r["tiled"] for r in rows]
    assert naive[-1] / naive[-2] == pytest.approx(4.0, rel=0.02)
    assert tiled[-1] / tiled[-2] < 2.05 and tiled[-1] < naive[-1] / 8


def test_traffic_on_paper():
    t = attention_traffic(4096, 4096, 128, block_q=128)
    assert t["flops"] / t["naive_bytes"] == pytest.approx(64, rel=0.05)  # Dh / 2 FLOP per byte in bf16
    assert t["flops"] / t["tiled_bytes"] == pytest.approx(128, rel=0.05)  # about block_q


# ---- the other masks the model builds: chapter 11's fixed-shape cache, chapter 15's sliding windows

def _random_model(seed=0, **over):
    from qwen3_scratch.config import Qwen3Config
    cfg = Qwen3Config(**{**dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=256), **over})
    torch.manual_seed(seed)
    model = Qwen3Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("impl", ["flash", pytest.param("triton", marks=needs_triton)])
def test_fixed_shape_cache_decoding_equals_plain_generate(impl):
    from qwen3_scratch.fast import fast_generate
    model = _random_model()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    want = generate(model, ids, 8)  # sdpa, chapter 9's cache
    model.set_attn_implementation(impl)  # chapter 11's cache: (B, K, 256, Dh) buffers, unwritten slots masked
    assert torch.equal(fast_generate(model, ids, 8, max_len=32), want)


@pytest.mark.parametrize("impl", ["flash", pytest.param("triton", marks=needs_triton)])
def test_sliding_window_layers_with_a_rolling_cache(impl):
    from qwen3_scratch.long_context import RollingKVCache
    model = _random_model(use_sliding_window=True, sliding_window=6, max_window_layers=1)  # layer 1 slides
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    outs = {}
    for name in ("sdpa", impl):
        model.set_attn_implementation(name)
        cache = RollingKVCache.for_model(model, 1, 20)
        with torch.no_grad():
            steps = [model(ids[:, :9], kv_cache=cache)]  # a prefill of 9, then one token at a time
            steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(9, 20)]
            outs[name] = (torch.cat(steps, 1), model(ids))  # (1, 20, V) cached, and in one pass
    assert (outs[impl][0] - outs["sdpa"][0]).abs().max() < 1e-4
    assert (outs[impl][1] - outs["sdpa"][1]).abs().max() < 1e-4
