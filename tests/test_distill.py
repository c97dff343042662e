"""Tests for chapter 19's distillation losses and loop: each loss and its gradient against a hand computation on a
tiny batch (forward KL at a temperature with its T² factor, the top-k + tail-bucket KL, reverse KL, the sampled-token
estimator's expected gradient), the top-k cache (lazy, exact, compact), fixed-window batches, the three modes of
distill_step, on-policy learning, and clear errors."""
import math

import pytest
import torch
import torch.nn.functional as F

from qwen3_scratch.distill import (DistillConfig, TopKCache, WindowBatches, distill, distill_loss, distill_step,
                                   kl_to_teacher, kl_to_topk, reverse_kl, reverse_kl_sampled, score_samples,
                                   topk_targets)
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.trainer import IGNORE_INDEX, make_optimizer
from qwen3_scratch.pretrain import init_weights, tiny_config


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


# two positions, a vocabulary of five: teacher and student logits written out by hand
T_LOGITS = [[2.0, 1.0, 0.0, -1.0, 0.5], [0.0, 3.0, -2.0, 1.0, 1.0]]
S_LOGITS = [[1.0, 1.5, -0.5, 0.0, 0.0], [0.5, 1.0, 0.0, 0.0, 2.0]]


def _logits():
    return torch.tensor([T_LOGITS]), torch.tensor([S_LOGITS], requires_grad=True)  # (1, 2, 5) each


def test_forward_kl_and_its_gradient_by_hand():
    for tau in (1.0, 2.0):
        t, s = _logits()
        loss = kl_to_teacher(s, t, tau)
        hand, grads = 0.0, []
        for zt, zs in zip(T_LOGITS, S_LOGITS):
            p, q = _softmax([v / tau for v in zt]), _softmax([v / tau for v in zs])
            hand += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / 2  # mean over the 2 positions
            grads.append([tau * (qi - pi) / 2 for pi, qi in zip(p, q)])  # d(tau^2 KL)/dz = tau (q - p), / 2
        assert abs(loss.item() - tau ** 2 * hand) < 1e-6
        loss.backward()
        torch.testing.assert_close(s.grad[0], torch.tensor(grads), rtol=0, atol=1e-6)


def test_distill_loss_mixes_and_skips_ignored_positions():
    t, s = _logits()
    y = torch.tensor([[1, IGNORE_INDEX]])
    loss, ce, kl = distill_loss(s, y, teacher_logits=t, alpha=0.25, temperature=2.0)
    q0 = _softmax(S_LOGITS[0])
    assert abs(ce.item() + math.log(q0[1])) < 1e-6  # only position 0 counts
    p, q = _softmax([v / 2 for v in T_LOGITS[0]]), _softmax([v / 2 for v in S_LOGITS[0]])
    assert abs(kl.item() - 4 * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))) < 1e-6
    assert abs(loss.item() - (0.75 * ce.item() + 0.25 * kl.item())) < 1e-6
    for bad, match in ((dict(alpha=1.5), "alpha"), (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=match):
            distill_loss(s, y, teacher_logits=t, **bad)
    with pytest.raises(ValueError, match="exactly one"):
        distill_loss(s, y)


def test_topk_kl_keeps_the_tail_as_one_bucket():
    tau, k = 2.0, 2
    t, s = _logits()
    logp, idx = topk_targets(t, k, tau)
    assert idx[0, 0].tolist() == [0, 1] and idx[0, 1].tolist() == [1, 3] or idx[0, 1].tolist() == [1, 4]
    loss = kl_to_topk(s, logp, idx, tau)
    hand, grads = 0.0, []
    for row, (zt, zs) in enumerate(zip(T_LOGITS, S_LOGITS)):
        p, q = _softmax([v / tau for v in zt]), _softmax([v / tau for v in zs])
        top = idx[0, row].tolist()
        p_tail, q_tail = 1 - sum(p[i] for i in top), 1 - sum(q[i] for i in top)
        hand += (sum(p[i] * math.log(p[i] / q[i]) for i in top) + p_tail * math.log(p_tail / q_tail)) / 2
        # top tokens: q - p; tail tokens keep the student's shape, scaled so the bucket moves toward p_tail
        grads.append([tau * (q[j] - p[j] if j in top else q[j] * (1 - p_tail / q_tail)) / 2 for j in range(5)])
    assert abs(loss.item() - tau ** 2 * hand) < 1e-6
    loss.backward()
    torch.testing.assert_close(s.grad[0], torch.tensor(grads), rtol=0, atol=1e-6)


def test_topk_kl_bounds():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    full = kl_to_teacher(s, t, 1.5)
    torch.testing.assert_close(kl_to_topk(s, *topk_targets(t, 50, 1.5), 1.5), full)  # k = V: exact
    s_all = s.clone().requires_grad_()
    kl_to_topk(s_all, *topk_targets(t, 50, 1.5), 1.5).backward()
    assert torch.isfinite(s_all.grad).all(), "an empty tail must not give NaN gradients"
    last = 0.0
    for k in (1, 4, 16, 49):  # lumping outcomes loses information: below the full KL, closer as k grows
        kl = kl_to_topk(s, *topk_targets(t, k, 1.5), 1.5).item()
        assert last - 1e-6 <= kl <= full.item() + 1e-6
        last = kl
    # when the student's tail has the teacher's shape, the bucket loses nothing
    logp_t = F.log_softmax(t, -1)
    top = logp_t.topk(8, -1).indices
    s_same = logp_t.clone().scatter(-1, top, torch.randn(3, 7, 8, generator=g))  # same tail up to one constant
    torch.testing.assert_close(kl_to_topk(s_same, *topk_targets(t, 8)), kl_to_teacher(s_same, t))


def test_reverse_kl_and_its_gradient_by_hand():
    t, s = _logits()
    mask = torch.tensor([[False, True]])  # only position 1 counts
    loss = reverse_kl(s, t, mask)
    p, q = _softmax(T_LOGITS[1]), _softmax(S_LOGITS[1])
    kl = sum(qi * math.log(qi / pi) for pi, qi in zip(p, q))
    assert abs(loss.item() - kl) < 1e-6
    loss.backward()
    grad = [qj * (math.log(qj / pj) - kl) for pj, qj in zip(p, q)]  # d/dz_j sum q (log q - log p)
    torch.testing.assert_close(s.grad[0], torch.tensor([[0.0] * 5, grad]), rtol=0, atol=1e-6)


def test_sampled_estimator_is_unbiased_but_noisy():
    t, s = _logits()
    reverse_kl(s, t).backward()
    exact = s.grad.clone()
    q = F.softmax(s.detach(), -1)  # (1, 2, 5)
    expected = torch.zeros_like(exact)
    for a in range(5):  # every pair of sampled tokens, weighted by its probability under the student
        for b in range(5):
            s.grad = None
            surrogate, estimate = reverse_kl_sampled(s, t, torch.tensor([[a, b]]))
            surrogate.backward()
            expected += q[0, 0, a] * q[0, 1, b] * s.grad
    torch.testing.assert_close(expected, exact, rtol=0, atol=1e-6)
    s.grad = None
    reverse_kl_sampled(s, t, torch.tensor([[4, 0]]))[0].backward()
    assert (s.grad - exact).abs().max() > 0.05, "one sample gives a different gradient"


def _tiny(seed, layers=1, vocab=64):
    cfg = tiny_config(vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return init_weights(Qwen3Model(cfg), std=0.1, seed=seed)


def test_window_batches():
    ids = torch.arange(101, dtype=torch.int32)
    b = WindowBatches(ids, batch_size=3, seq_len=10, seed=1)
    assert b.num_windows == 10
    x, y, w = b.get_batch(0)
    assert x.shape == y.shape == (3, 10) and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[:, 0], w * 10)
    seen = torch.cat([b.window_ids(s) for s in range(10)])  # 30 windows = 3 epochs, each a permutation
    assert all(sorted(seen[i:i + 10].tolist()) == list(range(10)) for i in (0, 10, 20))
    assert torch.equal(WindowBatches(ids, 3, 10, seed=1).get_batch(4)[0], b.get_batch(4)[0])
    assert not torch.equal(WindowBatches(ids, 3, 10, seed=2).window_ids(0), b.window_ids(0))
    with pytest.raises(ValueError, match="seq_len"):
        WindowBatches(ids[:5], 1, 10)


def test_topk_cache_is_lazy_exact_and_compact():
    teacher = _tiny(0).eval()
    b = WindowBatches(torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0)), 2, 16)
    cache = TopKCache(teacher, b, k=8, temperature=2.0)
    assert cache.indices.dtype == torch.int16 and cache.bytes_per_token == 8 * 4
    logp, idx = cache.get(torch.tensor([3, 5]))
    with torch.no_grad():
        ref_logp, ref_idx = topk_targets(teacher(b.window(torch.tensor([3, 5]))[:, :-1]), 8, 2.0)
    assert torch.equal(idx, ref_idx) and (logp - ref_logp).abs().max() < 1e-2  # fp16 storage
    assert cache.teacher_tokens == 32 and cache.filled.sum() == 2
    cache.get(torch.tensor([5, 3, 5]))
    assert cache.teacher_tokens == 32, "a cached window is never recomputed"
    with pytest.raises(ValueError, match="top_k"):
        TopKCache(teacher, b, k=65)


def test_distill_step_modes_agree_where_they_should():
    teacher = _tiny(0, layers=2).eval()
    ids = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(1))
    b = WindowBatches(ids, 2, 16)
    grads = {}
    for name, kw in (("recompute", dict(top_k=0)), ("cache", dict(top_k=64))):
        student = _tiny(1)
        cfg = DistillConfig(mode="offpolicy", steps=1, batch_size=2, seq_len=16, alpha=0.7, temperature=2.0, **kw)
        opt, sch = make_optimizer(student, cfg)
        cache = TopKCache(teacher, b, 64, 2.0) if kw["top_k"] else None
        opt.register_step_pre_hook(  # the gradients, just before AdamW uses them
            lambda *_, name=name, p=student.embed_tokens.weight: grads.__setitem__(name, p.grad.clone()))
        stats = distill_step(student, opt, sch, b, 0, cfg, teacher=None if cache else teacher, cache=cache)
        assert stats["tokens"] == 32 and math.isfinite(stats["kl"]) and math.isfinite(stats["ce"])
    torch.testing.assert_close(grads["cache"], grads["recompute"], rtol=0, atol=2e-3 * grads["recompute"].abs().max())
    with pytest.raises(ValueError, match="needs a teacher"):
        distill_step(_tiny(1), *make_optimizer(_tiny(1), DistillConfig()), b, 0, DistillConfig(batch_size=2, seq_len=16))
    with pytest.raises(ValueError, match="mode must be"):
        DistillConfig(mode="online")
    with pytest.raises(ValueError, match="prompt_tokens"):
        DistillConfig(mode="onpolicy", seq_len=16, prompt_tokens=16)


def test_onpolicy_distillation_lowers_the_reverse_kl():
    torch.manual_seed(0)
    teacher = _tiny(0, layers=2, vocab=32).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a peaked teacher: a clear target
    ids = torch.randint(0, 32, (600,), generator=torch.Generator().manual_seed(1))
    b = WindowBatches(ids, 8, 16)
    student = _tiny(1, vocab=32)
    prompts = b.get_batch(99)[0][:, :4]
    before = score_samples(student, teacher, prompts, 16, torch.Generator().manual_seed(0))
    cfg = DistillConfig(mode="onpolicy", steps=40, batch_size=8, seq_len=16, prompt_tokens=4, lr=1e-2,
                        warmup_steps=2)
    hist = distill(student, b, cfg, teacher)
    after = score_samples(student, teacher, prompts, 16, torch.Generator().manual_seed(0))
    assert hist["train"][-1]["tokens"] == 40 * 8 * 16 and hist["train"][0]["ce"] is None
    assert after["reverse_kl"] < 0.5 * before["reverse_kl"], (before, after)
    assert after["teacher_nll"] < before["teacher_nll"]


def test_shared_teacher_runs_once_per_batch():
    from qwen3_scratch.distill import SharedTeacher
    teacher = _tiny(0).eval()
    shared = SharedTeacher(teacher)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        first = shared(x)
        assert shared(x.clone()) is first and shared.forwards == 1
        assert torch.equal(first, teacher(x))
        shared(x[:1])  # another batch: computed again
    assert shared.forwards == 2 and shared.config is teacher.config
