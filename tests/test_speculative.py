"""Speculative decoding (qwen3_scratch/speculative.py): greedy output equals the target's own, token for token, on many
prompts and every k from 1 to 8 (random models and the shipped one); after rollbacks both caches equal a fresh prefill;
the resampling rule matches its closed form; and sampled tokens follow the target's distribution (seeded chi-square
tests, deterministic, that a wrong rule fails)."""
import copy
import dataclasses
import inspect

import pytest
import torch

from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.generate import generate, sample_next
from qwen3_scratch.kv_cache import KVCache
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch import speculative
from qwen3_scratch.speculative import (SpecStats, accept_greedy, accept_sampled, check_tokenizers, residual_probs,
                                       sampling_probs, speculative_generate, stream_speculative)
from qwen3_scratch.tokenizer import Qwen3Tokenizer
from qwen3_scratch.utils import package_dir
from qwen3_scratch.weights import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread
SHIPPED = package_dir() / "data" / "shakespeare" / "model"


def tiny(seed, layers=3, hidden=64, vocab=256, std=0.3, dtype=torch.float64, heads=4, kv_heads=2):
    """A random Qwen3 with larger weights than the default init (varied, confident tokens). float64: a (k+1)-token
    forward and k+1 one-token forwards then agree far below any gap between two logits, so greedy ties cannot flip."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      max_position_embeddings=256)
    model = Qwen3Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.to(dtype)


def first_layers(model, n):
    """A draft made of the target's first n layers (a crude depth-pruned student): it agrees with the target often
    enough that rounds end in every way (all kept, some kept, none kept)."""
    draft = copy.deepcopy(model)
    draft.layers = draft.layers[:n]
    draft.config = dataclasses.replace(model.config, num_hidden_layers=n)
    return draft


def prompts(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, 1 + 3 * i), generator=g) for i in range(n)]  # lengths 1, 4, 7, ...


@pytest.fixture(scope="module")
def target():
    model = tiny(0, layers=2)
    with torch.no_grad():  # a quieter last layer: the draft made of the first one agrees about half of the time
        model.layers[-1].self_attn.o_proj.weight.mul_(0.3)
        model.layers[-1].mlp.down_proj.weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def drafts(target):
    return {"random": tiny(1, layers=1, hidden=32), "first layer": first_layers(target, 1), "itself": target}


def test_greedy_equals_the_target_alone_for_every_k(target, drafts):
    for name, draft in drafts.items():
        total = SpecStats()
        for ids in prompts(4, 256):
            want = generate(target, ids, 16)
            for k in range(1, 9):
                stats = SpecStats()
                got = speculative_generate(target, draft, ids, 16, k=k, stats=stats)
                assert torch.equal(got, want), f"draft {name!r}, k={k}, prompt {ids.tolist()}: not the target's tokens"
                assert stats.new_tokens == 16 and stats.rounds * (k + 1) >= 16
                assert stats.drafted == stats.draft_forwards <= 15 * k and stats.accepted <= stats.checked
                total = total + stats
        if name == "itself":
            assert total.acceptance_rate == 1.0, "a draft identical to the target must never be rejected"
        print(f"{name}: {total.summary()}")
    assert 0 < (total.rounds and total.accepted)


def test_greedy_stops_like_generate_on_stop_tokens_and_max_new_tokens(target, drafts):
    draft = drafts["first layer"]
    for ids in prompts(3, 256, seed=1):
        plain = generate(target, ids, 20)[0, ids.shape[1]:].tolist()
        stop = plain[7]  # a stop token that greedy decoding meets after 7 tokens (or earlier, if it repeats)
        want = generate(target, ids, 20, eos_token_id=[stop, 255])
        for k in range(1, 9):
            got = speculative_generate(target, draft, ids, 20, k=k, eos_token_id=[stop, 255])
            assert torch.equal(got, want), f"k={k}: must stop right after the first stop token, as generate does"
            for n in {1, 2, k + 1}:
                assert torch.equal(speculative_generate(target, draft, ids, n, k=k), generate(target, ids, n))


def test_greedy_on_the_shipped_model():
    """The shipped Shakespeare model in float32 as the target, with a draft of its own first two layers (and, for two
    values of k, a random one of the same vocabulary)."""
    target = load_pretrained(SHIPPED, dtype=torch.float32, device="cpu").eval()
    drafts = {"first 2 layers": (first_layers(target, 2), (1, 2, 3, 5, 8)),
              "random": (tiny(3, 1, 32, vocab=4096).float(), (1, 4))}
    tok = Qwen3Tokenizer(SHIPPED)
    for name, (draft, ks) in drafts.items():
        stats = SpecStats()
        for text in ("KING.\nWhat news, my lord?\n\n", "HAMLET.\nTo be", "O"):
            ids = torch.tensor([tok.encode(text)])
            want = generate(target, ids, 12, eos_token_id=tok.endoftext_id)
            for k in ks:
                got = speculative_generate(target, draft, ids, 12, k=k, eos_token_id=tok.endoftext_id, stats=stats)
                assert torch.equal(got, want), f"{name} draft, k={k}, prompt {text!r}"
        print(name, stats.summary())


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_rollback_leaves_both_caches_equal_to_a_fresh_prefill(target, drafts, fixed_shape):
    """Drive the real loop and look into its caches after every token: each holds exactly the keys and values that a
    fresh prefill of the tokens so far writes, whatever was drafted, rejected and rolled back before."""
    def fresh(model, seq, n):
        cache = KVCache.for_model(model, 1, 64)
        model(torch.tensor([seq[:n]]), kv_cache=cache)
        return cache.k[:, :, :, :n], cache.v[:, :, :, :n]

    def held(cached, n):  # (L, 1, K, n, Dh) from either kind of cache
        c = cached.cache
        if isinstance(c, KVCache):
            return c.k[:, :, :, :n], c.v[:, :, :, :n]
        return torch.stack(c.k)[:, :, :, :n], torch.stack(c.v)[:, :, :, :n]

    def loop_variables(steps):  # the local variables of _speculate, inside torch.no_grad's generator wrapper
        while steps.gi_code.co_name != "_speculate":
            steps = next(v for v in steps.gi_frame.f_locals.values() if inspect.isgenerator(v))
        return steps.gi_frame.f_locals

    ids, stats = prompts(3, 256, seed=2)[2], SpecStats()
    draft = drafts["first layer"]
    steps = stream_speculative(target, draft, ids, 24, k=4, stats=stats, fixed_shape=fixed_shape)
    seq, held_after = ids[0].tolist(), []
    with torch.no_grad():
        for token in steps:
            seq.append(int(token))
            frame = loop_variables(steps)  # its two CachedModels, after the round's rollback
            for name, model in (("tgt", target), ("drf", draft)):
                held_after.append((name, model, frame[name].pos, [t.clone() for t in held(frame[name], frame[name].pos)]))
            if frame["i"] == len(frame["new"]) - 1:  # the round's last token: the target holds all but it
                assert frame["tgt"].pos == len(seq) - 1
        for name, model, pos, kv in held_after:  # the tokens decided by then are a prefix of the final sequence
            for a, b in zip(kv, fresh(model, seq, pos)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"{name}'s cache after rollback ({pos} tokens)")
    assert stats.checked > stats.accepted > 0, "rounds with rejections (rollbacks) and acceptances must both happen"


def test_residual_rule_matches_its_closed_form():
    g = torch.Generator().manual_seed(0)
    p, q = torch.rand(5, 7, generator=g, dtype=torch.float64), torch.rand(5, 7, generator=g, dtype=torch.float64)
    p[:, 0], q[:, 1] = 0, 0  # tokens one of the two filtered out (top-k / top-p)
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    r = residual_probs(p, q)
    excess = torch.clamp(p - q, min=0)
    torch.testing.assert_close(r, excess / excess.sum(-1, keepdim=True), rtol=0, atol=1e-15)
    # the rule's output distribution: kept drafts min(p, q), plus the rejected mass 1 - sum(min(p, q)) spread as r
    kept = torch.minimum(p, q)  # q(x) * min(1, p(x) / q(x))
    torch.testing.assert_close(kept + (1 - kept.sum(-1, keepdim=True)) * r, p, rtol=0, atol=1e-15)
    assert torch.equal(residual_probs(p, p), p), "p == q: nothing to resample from, fall back to p"
    assert (r[:, 0] == 0).all(), "a token the target filtered out is never drawn"


def chi_square_p_value(counts, probs):
    """P(chi-square >= the statistic) for observed counts against expected probabilities; cells expected below 5 are
    pooled into one cell, as the test requires."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def always_accept(p, q, drafted, generator=None):  # a wrong rule: the draft's tokens unchecked (emits q's tokens)
    k = drafted.shape[0]
    return k, torch.multinomial(p[k], 1, generator=generator)[0]


def resample_from_p(p, q, drafted, generator=None):  # a subtly wrong rule: after a rejection, draw from p itself
    k = drafted.shape[0]
    u = torch.rand(k, generator=generator, dtype=p.dtype)
    rows = torch.arange(k)
    n = int((u * q[rows, drafted] < p[rows, drafted]).long().cumprod(0).sum())
    return n, torch.multinomial(p[n], 1, generator=generator)[0]


def test_the_sampling_rule_emits_the_targets_distribution():
    """The rule alone, on fixed tables (V = 6, k = 3): the first token it emits (the first draft if kept, else the
    replacement) must follow p_0. 8,000 seeded draws: the right rule passes, both wrong ones fail by far."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04]] * 4, dtype=torch.float64)
    q = torch.tensor([[0.10, 0.15, 0.20, 0.35, 0.10, 0.10]] * 3, dtype=torch.float64)
    values = {}
    for name, rule in (("right", accept_sampled), ("always accept", always_accept), ("resample p", resample_from_p)):
        counts = torch.zeros(6, dtype=torch.long)
        for _ in range(8_000):
            drafted = torch.multinomial(q, 1, generator=g)[:, 0]  # (3,) one draft token per row
            n, nxt = rule(p, q, drafted, generator=g)
            counts[int(drafted[0]) if n >= 1 else int(nxt)] += 1
        values[name] = chi_square_p_value(counts, p[0])
    print(values)
    assert values["right"] > 1e-3, f"the rejection rule must reproduce p: {values}"
    assert values["always accept"] < 1e-9 and values["resample p"] < 1e-9, f"wrong rules must be caught: {values}"


def test_speculative_sampling_reproduces_the_targets_distribution(monkeypatch):
    """End to end on two different random models with 8 tokens: the joint distribution of the first two tokens
    (64 cells) after a fixed prompt, k = 2, against the target's exact one (from its full forwards, processed like
    sample_next: temperature, top-k and top-p). Seeded: the verdict is the same on every run. The 'always accept'
    rule must fail. (The rule itself, and wrong rules subtler than this one, are tested on tables above.)"""
    settings = dict(temperature=0.7, top_k=5, top_p=0.9)
    target, draft = tiny(10, layers=1, hidden=16, vocab=8, std=0.6, heads=2, kv_heads=1), \
        tiny(11, layers=1, hidden=16, vocab=8, std=0.6, heads=2, kv_heads=1)
    ids = torch.tensor([[3, 1, 4]])
    with torch.no_grad():
        p1 = sampling_probs(target(ids)[0, -1], **settings)  # (V,)
        both = torch.cat([ids.expand(8, 3), torch.arange(8)[:, None]], dim=1)  # (V, 4): every first token
        p2 = sampling_probs(target(both)[:, -1], **settings)  # (V, V): the second token given the first
    exact = (p1[:, None] * p2).flatten()  # (64,)

    def sample_counts(n):
        g, counts = torch.Generator().manual_seed(0), torch.zeros(64, dtype=torch.long)
        for _ in range(n):
            out = speculative_generate(target, draft, ids, 3, k=2, generator=g, **settings)[0, 3:5].tolist()
            counts[out[0] * 8 + out[1]] += 1
        return counts

    right = chi_square_p_value(sample_counts(800), exact)
    monkeypatch.setattr(speculative, "accept_sampled", always_accept)
    wrong = chi_square_p_value(sample_counts(150), exact)
    print(settings, right, wrong)
    assert right > 1e-3, f"speculative sampling must follow the target's distribution (p = {right:.2g})"
    assert wrong < 1e-9, f"the 'always accept' rule must be caught (p = {wrong:.2g})"


@pytest.mark.parametrize("settings", [dict(temperature=0.7), dict(temperature=1.0, top_k=5),
                                      dict(temperature=0.8, top_p=0.9), dict(temperature=1.3, top_k=20, top_p=0.5)])
def test_sampling_probs_are_what_sample_next_draws_from(settings):
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0)) * 3
    probs = sampling_probs(logits, **settings)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    for seed in range(50):
        ours = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        theirs = sample_next(logits, **settings, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ours, theirs), f"seed {seed}: sampling_probs must be sample_next's distribution"


def test_accept_greedy_keeps_the_agreeing_prefix_and_adds_the_targets_token():
    logits = torch.full((4, 10), -1.0)
    for row, best in enumerate([5, 7, 2, 9]):  # the target's argmax after the last token, then after each draft
        logits[row, best] = 1.0
    assert [(n, int(t)) for n, t in [accept_greedy(logits, torch.tensor(d)) for d in ([5, 7, 3], [5, 7, 2], [1, 7, 2])]] \
        == [(2, 2), (3, 9), (0, 5)]  # correction, bonus, immediate correction
    n, t = accept_greedy(logits[:1], torch.zeros(0, dtype=torch.long))
    assert (n, int(t)) == (0, 5), "k = 0 is a plain decode step"


def test_sampled_runs_are_reproducible_and_count_what_they_did(target, drafts):
    ids = prompts(2, 256, seed=3)[1]
    runs = []
    for _ in range(2):
        stats = SpecStats()
        out = speculative_generate(target, drafts["first layer"], ids, 20, k=3, temperature=0.9, top_k=50,
                                   generator=torch.Generator().manual_seed(7), stats=stats)
        runs.append((out, stats))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1], "a seeded generator fixes the output"
    stats = runs[0][1]
    assert stats.new_tokens == 20 and stats.target_forwards == stats.rounds + 1 and stats.checked >= stats.accepted
    assert stats.tokens_per_target_forward == 20 / stats.rounds and 1 <= stats.tokens_per_target_forward <= 4
    line = stats.summary()
    assert line.startswith("speculative decoding: 20 tokens in ") and "acceptance" in line


def test_fixed_shape_and_compiled_paths_give_the_same_tokens(target, drafts):
    """Chapter 11's fixed-shape cache, eager and captured whole by torch.compile (aot_eager: the graph capture without
    inductor's slow code generation; the benchmark uses inductor)."""
    ids = prompts(3, 256, seed=4)[2]
    want = generate(target, ids, 16)
    for options in (dict(fixed_shape=True), dict(compile="aot_eager")):
        got = speculative_generate(target, drafts["first layer"], ids, 16, k=3, **options)
        assert torch.equal(got, want), f"{options}: not the target's greedy tokens"


def test_bad_arguments_are_named(target, drafts):
    draft, ids = drafts["random"], torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="one sequence at a time: input_ids has 2 rows"):
        speculative_generate(target, draft, ids.expand(2, 3), 4)
    with pytest.raises(ValueError, match="the draft's vocabulary has 300 entries and the target's 256"):
        speculative_generate(target, tiny(5, 1, 16, vocab=300), ids, 4)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k \\(draft tokens per round\\) must be a positive integer"):
            speculative_generate(target, draft, ids, 4, k=k)
    short = tiny(6, 1, 32)
    short.config = dataclasses.replace(short.config, max_position_embeddings=5)
    with pytest.raises(ValueError, match="exceeds the draft's context window, max_position_embeddings=5"):
        speculative_generate(target, short, ids, 4)
    with pytest.raises(ValueError, match="eos_token_id must be"):
        speculative_generate(target, draft, ids, 4, eos_token_id="x")
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, draft, ids, 4, temperature=float("nan"))
    with pytest.raises(ValueError, match="not a token id of this model"):
        speculative_generate(target, draft, torch.tensor([[256]]), 4)


def test_tokenizers_must_match():
    shakespeare, qwen = Qwen3Tokenizer(SHIPPED), Qwen3Tokenizer()
    check_tokenizers(shakespeare, Qwen3Tokenizer(SHIPPED))
    with pytest.raises(ValueError, match=r"--draft x: its tokenizer differs from the target's \(4096 vs 151669 tokens"):
        check_tokenizers(qwen, shakespeare, what="--draft x")
