"""GRPO (chapter 18): the loss and its gradient against a hand computation, advantages, micro-batches that add up to
the batch's loss, and one real step on a tiny model."""
import math

import pytest
import torch

from qwen3_scratch.grpo import (GRPOConfig, group_advantages, grpo_loss, grpo_step, k3_kl, rollout, token_logprobs,
                                train_grpo)

# a toy batch: 2 replies of 3 and 2 tokens (the second padded), chosen so that every branch of the clip is taken
LOGP = [[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]]
OLD = [[-1.0, -0.9, -1.5], [-1.0, -0.5, 0.0]]  # ratios: 1, e^0.4 = 1.49 (clipped), e^-0.5; e^0.7, e^-0.7
REF = [[-1.2, -0.4, -2.2], [-0.3, -1.0, 0.0]]
ADV = [1.5, -0.5]
MASK = [[1, 1, 1], [1, 1, 0]]
EPS, BETA = 0.2, 0.1


def hand_loss(norm):
    """The loss and d loss / d logp, written out token by token with Python floats."""
    per_seq, grads = [], [[0.0] * 3 for _ in range(2)]
    total_tokens = sum(map(sum, MASK))
    for i in range(2):
        n_i = sum(MASK[i])
        seq_sum = 0.0
        for t in range(3):
            if not MASK[i][t]:
                continue
            lp, old, ref, a = LOGP[i][t], OLD[i][t], REF[i][t], ADV[i]
            rho = math.exp(lp - old)
            clipped = min(max(rho, 1 - EPS), 1 + EPS)
            surrogate = min(rho * a, clipped * a)
            d_surrogate = rho * a if rho * a <= clipped * a else 0.0  # the clipped branch is flat
            kl = math.exp(ref - lp) - (ref - lp) - 1
            d_kl = 1 - math.exp(ref - lp)
            term, d_term = -(surrogate - BETA * kl), -(d_surrogate - BETA * d_kl)
            seq_sum += term
            weight = 1 / total_tokens if norm == "token" else 1 / (n_i * 2)
            grads[i][t] = d_term * weight
        per_seq.append(seq_sum)
    loss = sum(per_seq) / total_tokens if norm == "token" else sum(s / sum(m) for s, m in zip(per_seq, MASK)) / 2
    return loss, grads


@pytest.mark.parametrize("norm", ["token", "sequence"])
def test_loss_and_gradient_match_a_hand_computation(norm):
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(logp, torch.tensor(OLD, dtype=torch.float64), torch.tensor(REF, dtype=torch.float64),
                            torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK), EPS, BETA, norm)
    loss.backward()
    want, want_grad = hand_loss(norm)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    assert torch.allclose(logp.grad, torch.tensor(want_grad, dtype=torch.float64), atol=1e-12)
    assert logp.grad[1, 2] == 0, "a padded position gets no gradient"
    assert logp.grad[0, 1] == pytest.approx(-BETA * (1 - math.exp(REF[0][1] - LOGP[0][1])) * -1 *
                                            (1 / 5 if norm == "token" else 1 / 6)), "clipped: only the KL pulls"
    # 4 of 5 ratios lie outside [0.8, 1.2], but the clip takes over (and stops the gradient) only where it lowers
    # the objective: ratio 1.49 with A > 0 and ratio 0.50 with A < 0
    assert stats["clip_fraction"] == pytest.approx(2 / 5)


def test_token_and_sequence_norms_weigh_long_replies_differently():
    # the same per-token loss everywhere: token-level gives each token 1/total, sequence-level 1/(n_i * N)
    logp = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    for norm, short_weight in (("token", 1 / 5), ("sequence", 1 / 2)):
        logp.grad = None
        loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([-1.0, -1.0]), mask, norm=norm)
        loss.backward()
        assert logp.grad[1, 0].item() == pytest.approx(short_weight), norm


def test_k3_is_never_negative_and_zero_at_equal_policies():
    a, b = torch.randn(1000), torch.randn(1000)
    assert (k3_kl(a, b) >= 0).all()
    assert k3_kl(a, a).abs().max() == 0
    # unbiased: E_{x~p}[k3] = KL(p || q) for a small categorical
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    expected = float((p * (p / q).log()).sum())
    assert float((p * k3_kl(p.log(), q.log())).sum()) == pytest.approx(expected, abs=1e-6)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(r, 4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3), "(r - mean) / std, std = 0.5"
    assert adv[4:].abs().max() == 0, "a group that all agree teaches nothing"
    assert torch.allclose(group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r[:7], 4)
    with pytest.raises(ValueError, match="norm"):
        grpo_loss(r[None], r[None], r[None], r[:1], r[None], norm="batch")
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)


@pytest.fixture(scope="module")
def tiny(one_thread):
    from qwen3_scratch.config import Qwen3Config
    from qwen3_scratch.model import Qwen3Model
    from qwen3_scratch.reasoning import save_chat_tokenizer
    from qwen3_scratch.tokenizer import Qwen3Tokenizer
    import tempfile
    tok = Qwen3Tokenizer(save_chat_tokenizer(tempfile.mkdtemp()))
    cfg = Qwen3Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                      bos_token_id=None, eos_token_id=tok.im_end_id)
    from qwen3_scratch.pretrain import init_weights
    return init_weights(Qwen3Model(cfg), seed=0), Qwen3Model(cfg), tok  # small weights: diverse samples


def test_one_step_micro_batches_add_up_and_move_the_policy(tiny):
    policy, ref, tok = tiny
    ref.load_state_dict(policy.state_dict())
    prompts = [tok.encode("What is 1 + 2?"), tok.encode("What is 30 * 4?")]
    gen = torch.Generator().manual_seed(0)
    replies = rollout(policy, tok, prompts, group_size=4, temperature=1.0, max_new_tokens=12, generator=gen)
    assert len(replies) == 8 and all(1 <= len(r) <= 12 for r in replies)
    assert len({tuple(r) for r in replies[:4]}) > 1, "a group of identical replies would cancel out"
    rows = [p for p in prompts for _ in range(4)]
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    grads = {}
    for micro in (10_000, 40):  # one micro-batch, then several: the same gradient
        policy.zero_grad()
        cfg = GRPOConfig(group_size=4, updates_per_batch=1, micro_batch_tokens=micro, lr=0.0)
        opt = torch.optim.SGD(policy.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        orig = opt.zero_grad
        opt.zero_grad = lambda set_to_none=True: None  # keep the gradients to compare them
        stats = grpo_step(policy, ref, opt, sched, rows, replies, rewards, cfg, tok.pad_token_id)
        opt.zero_grad = orig
        grads[micro] = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
        assert stats["kl"] == pytest.approx(0.0, abs=1e-6), "policy == reference before any update"
    assert torch.allclose(grads[10_000], grads[40], atol=1e-6), "micro-batches must add up to the batch's loss"
    before = [p.detach().clone() for p in policy.parameters()]
    cfg = GRPOConfig(group_size=4, updates_per_batch=2, lr=1e-2)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = grpo_step(policy, ref, opt, sched, rows, replies, rewards, cfg, tok.pad_token_id)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters())), "the policy moved"
    assert stats["kl"] > 0, "the second update is off the reference: KL > 0"
    assert stats["reward"] == pytest.approx(3 / 8)


def test_token_logprobs_equal_a_log_softmax(tiny):
    policy, _, tok = tiny
    ids = torch.tensor([tok.encode("What is 12 + 3?")])
    lp = token_logprobs(policy, ids)
    full = torch.log_softmax(policy(ids).float(), -1)
    assert torch.allclose(lp[0, 4], full[0, 4, ids[0, 5]])


def test_the_group_filter_trains_only_on_groups_that_disagree(tiny):
    import itertools
    policy, ref, tok = tiny
    ref.load_state_dict(policy.state_dict())
    prompt = tok.encode("What is 1 + 2?")
    always = lambda text: 1.0  # noqa: E731
    cfg = GRPOConfig(steps=1, prompts_per_step=2, group_size=4, max_new_tokens=6, filter_groups=True, lr=1e-2)
    before = [p.detach().clone() for p in policy.parameters()]
    history = train_grpo(policy, ref, tok, lambda step: [(prompt, always), (prompt, always)], cfg, log=None)
    assert history[0]["kept_groups"] == 0 and history[0]["reward"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters())), "no group disagrees: no update"
    calls = itertools.count()
    alternating = lambda text: float(next(calls) % 2)  # noqa: E731  0, 1, 0, 1
    history = train_grpo(policy, ref, tok, lambda step: [(prompt, always), (prompt, alternating)], cfg, log=None)
    assert history[0]["kept_groups"] == 0.5 and history[0]["reward"] == 0.75, "statistics count every rollout"
    assert history[0]["solved_groups"] == 0.5 and history[0]["failed_groups"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters())), "the mixed group is trained on"
