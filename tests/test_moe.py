"""Qwen3MoE and load_balancing_loss: shapes, routing invariants, sparse == dense, parity with transformers."""
import pytest
import torch

from qwen3_scratch.hf_port import state_dict_from_hf
from qwen3_scratch.moe import Qwen3MoE, load_balancing_loss

D, I, E, A = 48, 32, 8, 2


def make_moe(norm=True, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(hidden_size=D, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=A, norm_topk_prob=norm)
    args.update(kw)
    return Qwen3MoE(**args).eval()


def hf_block(norm, seed=0):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=A,
                         norm_topk_prob=norm, experts_implementation="eager")
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)
    return block


def test_shapes_and_names():
    moe = make_moe()
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        y = moe(x)
        logits, weights, experts = moe.route(x.reshape(-1, D))
    assert y.shape == x.shape and moe.forward_dense(x).shape == x.shape
    assert moe(torch.randn(7, D)).shape == (7, D)  # any leading shape
    assert logits.shape == (15, E) and weights.shape == (15, A) and experts.shape == (15, A)
    assert weights.dtype == x.dtype and experts.dtype == torch.long
    names = set(moe.state_dict())
    assert "gate.weight" in names and "gate.bias" not in names
    assert moe.gate.weight.shape == (E, D)
    assert {f"experts.{e}.{p}_proj.weight" for e in range(E) for p in ("gate", "up", "down")} <= names
    assert len(names) == 1 + 3 * E


@pytest.mark.parametrize("norm", [True, False])
def test_sparse_equals_dense(norm):
    moe = make_moe(norm, num_experts=16, num_experts_per_tok=4)
    x = torch.randn(2, 33, D)
    with torch.no_grad():
        diff = (moe(x) - moe.forward_dense(x)).abs().max().item()
    assert diff <= 1e-6, diff


def test_sparse_equals_dense_top1_and_all_experts():
    for k in (1, E):
        moe = make_moe(num_experts_per_tok=k)
        x = torch.randn(1, 9, D)
        with torch.no_grad():
            assert (moe(x) - moe.forward_dense(x)).abs().max() <= 1e-6, k


@pytest.mark.parametrize("norm", [True, False])
def test_matches_transformers_block(norm):
    hf = hf_block(norm)
    moe = make_moe(norm)
    moe.load_state_dict(state_dict_from_hf(hf.state_dict()), strict=True)
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        ours, ref = moe(x), hf(x)
        assert (ours - ref).abs().max().item() <= 1e-5
        assert (moe.forward_dense(x) - ref).abs().max().item() <= 1e-5
        # the router too: same logits, weights and choices as transformers' Qwen3MoeTopKRouter
        ref_logits, ref_w, ref_e = hf.gate(x.reshape(-1, D))
        logits, w, e = moe.route(x.reshape(-1, D))
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    assert torch.equal(e, ref_e) and torch.allclose(w, ref_w, atol=1e-6)


def test_norm_topk_prob_changes_output():
    hf = hf_block(True)
    on, off = make_moe(True), make_moe(False)
    on.load_state_dict(state_dict_from_hf(hf.state_dict()))
    off.load_state_dict(state_dict_from_hf(hf.state_dict()))
    x = torch.randn(1, 8, D)
    with torch.no_grad():
        assert not torch.allclose(on(x), off(x), atol=1e-4), "norm_topk_prob must matter"


def test_routing_weights():
    x = torch.randn(40, D)
    with torch.no_grad():
        _, w_on, e_on = make_moe(True).route(x)
        logits, w_off, e_off = make_moe(False).route(x)
    assert torch.allclose(w_on.sum(-1), torch.ones(40), atol=1e-6), "renormalized weights sum to 1"
    assert (w_off.sum(-1) < 1 - 1e-4).all(), "without renormalization the top-k mass is below 1"
    assert torch.equal(e_on, e_off), "renormalizing must not change which experts are chosen"
    assert torch.allclose(w_on[:, 0] / w_on[:, 1], w_off[:, 0] / w_off[:, 1], atol=1e-5), "ratios are kept"
    probs = torch.softmax(logits.float(), -1)
    assert torch.allclose(w_off, probs.gather(1, e_off), atol=1e-6), "weights are softmax over all experts"
    assert (w_on[:, 0] >= w_on[:, 1]).all(), "largest weight first"


def test_each_token_reaches_exactly_top_k_experts():
    moe = make_moe(num_experts=16, num_experts_per_tok=4)
    x = torch.randn(2, 25, D)
    with torch.no_grad():
        _, _, experts = moe.route(x.reshape(-1, D))
    assert all(len(set(row)) == 4 for row in experts.tolist())
    rows = torch.zeros(16, dtype=torch.long)

    def count(e):
        def hook(module, inputs, output):
            rows[e] += inputs[0].shape[0]
        return hook

    hooks = [ex.register_forward_hook(count(e)) for e, ex in enumerate(moe.experts)]
    with torch.no_grad():
        moe(x)
    for h in hooks:
        h.remove()
    assert rows.sum() == 50 * 4, rows
    assert torch.equal(rows, torch.bincount(experts.flatten(), minlength=16))


def test_each_token_gets_its_own_experts_only():
    # make expert e output e+1 in every dimension: the layer's output is then sum_k w_k * (e_k + 1)
    moe = make_moe(num_experts=16, num_experts_per_tok=4)
    x = torch.randn(30, D)
    moe.experts = torch.nn.ModuleList(_Const(e + 1.0) for e in range(16))
    with torch.no_grad():
        _, w, experts = moe.route(x)
        expected = (w * (experts + 1).float()).sum(-1, keepdim=True).expand(30, D)
        assert torch.allclose(moe(x), expected, atol=1e-6)


class _Const(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


def test_record_router_keeps_default_output():
    moe = make_moe()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        y0 = moe(x)
        assert moe.last_router_logits is None, "nothing is recorded by default"
        moe.record_router = True
        y1 = moe(x)
    assert isinstance(y1, torch.Tensor) and torch.equal(y0, y1)
    assert torch.allclose(moe.last_router_logits, moe.gate(x.reshape(-1, D)))


def test_bf16_routes_in_fp32():
    moe = make_moe().to(torch.bfloat16)
    x = torch.randn(4, D, dtype=torch.bfloat16)
    with torch.no_grad():
        logits, w, _ = moe.route(x)
        y = moe(x)
    assert w.dtype == torch.bfloat16 and y.dtype == torch.bfloat16 and logits.dtype == torch.bfloat16
    ref = torch.softmax(logits.float(), -1).topk(A, -1).values
    ref = (ref / ref.sum(-1, keepdim=True)).to(torch.bfloat16)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_matches_transformers(top_k, masked):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    torch.manual_seed(top_k)
    layers = tuple(torch.randn(3 * 7, 16) * 2 for _ in range(4))  # 4 layers x (B*T, E), B=3, T=7
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[2, :5] = 0
    m = mask if masked else None
    ours = load_balancing_loss(layers, 16, top_k, attention_mask=m)
    ref = load_balancing_loss_func(layers, 16, top_k, attention_mask=m)
    assert torch.allclose(ours, ref.float(), atol=1e-6), (ours, ref)
    single = load_balancing_loss(layers[0], 16, top_k, attention_mask=m)
    assert torch.allclose(single, load_balancing_loss_func(layers[:1], 16, top_k, attention_mask=m), atol=1e-6)
    # a (B, T, E) tensor is the same as its (B*T, E) view
    assert torch.allclose(single, load_balancing_loss(layers[0].view(3, 7, 16), 16, top_k, attention_mask=m))


def test_load_balancing_loss_ignores_padding_rows():
    torch.manual_seed(0)
    real = torch.randn(5, 8)
    junk = torch.randn(3, 8) * 10
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with_pad = load_balancing_loss(torch.cat([junk, real]), 8, 2, attention_mask=mask)
    assert torch.allclose(with_pad, load_balancing_loss(real, 8, 2))


def _biased(pairs, num_experts, strength=12.0):
    out = torch.zeros(len(pairs), num_experts)
    for n, pair in enumerate(pairs):
        out[n, list(pair)] = strength
    return out


@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (16, 2), (32, 4)])
def test_load_balancing_loss_balanced_vs_collapsed(num_experts, top_k):
    n = 4 * num_experts
    # balanced: token t prefers a block of top_k experts that cycles through all of them -> f_i = k/E, P_i = 1/E
    balanced = _biased([[(top_k * t + j) % num_experts for j in range(top_k)] for t in range(n)], num_experts)
    collapsed = _biased([list(range(top_k))] * n, num_experts)
    uniform = torch.zeros(n, num_experts)
    # balanced value: E * sum_i (k/E) * (1/E) = k  (1.0 for top-1, as in Switch Transformer)
    assert abs(load_balancing_loss(balanced, num_experts, top_k).item() - top_k) < 1e-3
    assert abs(load_balancing_loss(uniform, num_experts, top_k).item() - top_k) < 1e-6
    # collapsed: f_i = 1 on the k favourites, which carry ~all probability -> E
    assert abs(load_balancing_loss(collapsed, num_experts, top_k).item() - num_experts) < 1e-2
    torch.manual_seed(0)
    random = torch.randn(n, num_experts)  # a random router sits near the balanced value, far from collapse
    assert 0.9 * top_k < load_balancing_loss(random, num_experts, top_k) < num_experts / 2


def test_load_balancing_loss_gradient_pushes_overloaded_experts_down():
    torch.manual_seed(0)
    logits = torch.randn(256, 8)
    logits[:, 0] += 2.0
    logits.requires_grad_()
    load_balancing_loss(logits, 8, 2).backward()
    g = logits.grad.sum(0)
    assert g[0] > 0 and (g[1:] < g[0]).all()


def test_errors():
    with pytest.raises(ValueError, match="num_experts_per_tok.*num_experts"):
        Qwen3MoE(D, I, num_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Qwen3MoE(D, I, num_experts=4, num_experts_per_tok=0)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        Qwen3MoE(D, I, num_experts=4, num_experts_per_tok=-1)
    with pytest.raises(ValueError, match="num_experts"):
        Qwen3MoE(D, I, num_experts=0, num_experts_per_tok=1)
    with pytest.raises(ValueError, match="top_k.*num_experts"):
        load_balancing_loss(torch.randn(4, 8), 8, 9)
    with pytest.raises(ValueError, match="top_k"):
        load_balancing_loss(torch.randn(4, 8), 8, 0)
    with pytest.raises(ValueError, match="num_experts"):
        load_balancing_loss(torch.randn(4, 8), 16, 2)
