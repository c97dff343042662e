"""Tests for qwen3_scratch.generate: greedy decoding equals transformers' generate token for token (dense and
MoE, with stop tokens), left-padded batches, cache on/off, sampling filters, streaming, the limits, and the
chat session (history, thinking split)."""
import pytest
import torch

from hf_ref import tiny_hf_model
from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.generate import (RECOMMENDED_SAMPLING, ChatSession, StopTokens, filter_top_k, filter_top_p,
                                    generate, left_pad, print_stream, sample_next, stream_generate)
from qwen3_scratch.hf_port import from_transformers
from qwen3_scratch.tokenizer import Qwen3Tokenizer


@pytest.fixture(scope="module", params=["dense", "moe"])
def pair(request):
    hf = tiny_hf_model(moe=request.param == "moe")
    ours = from_transformers(hf)  # strict: every name matches
    return hf, ours


@pytest.fixture(scope="module")
def tok():
    return Qwen3Tokenizer()


def ids(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf, input_ids, n, **kw):
    kw.setdefault("pad_token_id", 0)
    return hf.generate(input_ids, max_new_tokens=n, do_sample=False, **kw)


# ---------------------------------------------------------------- greedy == transformers


def test_greedy_equals_transformers(pair):
    hf, ours = pair
    prompt = ids(2, 6)
    ref = hf_greedy(hf, prompt, 12)
    out = generate(ours, prompt, 12)
    assert out.shape == (2, 18) and out.dtype == torch.long
    assert torch.equal(out, ref), f"\nours {out[:, 6:].tolist()}\nhf   {ref[:, 6:].tolist()}"


def test_eos_stops_early_like_transformers(pair):
    hf, ours = pair
    prompt = ids(1, 5, seed=3)
    free = generate(ours, prompt, 12)[0, 5:]
    eos = int(free[3])
    first = int((free == eos).nonzero()[0])  # the token may already appear before step 3
    out = generate(ours, prompt, 12, eos_token_id=eos)
    assert out.shape[1] == 5 + first + 1, "generation ends right after the first stop token"
    assert torch.equal(out, hf_greedy(hf, prompt, 12, eos_token_id=eos, pad_token_id=eos))


def test_finished_rows_repeat_their_stop_token_like_transformers(pair):
    hf, ours = pair
    prompt = ids(2, 5, seed=4)
    free = generate(ours, prompt, 10)[:, 5:]
    eos = int(free[0, 2])  # row 0 stops at step 2 (or earlier); row 1 most likely keeps going
    out = generate(ours, prompt, 10, eos_token_id=[eos, 255], pad_token_id=eos)
    ref = hf_greedy(hf, prompt, 10, eos_token_id=[eos, 255], pad_token_id=eos)
    assert torch.equal(out, ref)
    row0 = out[0, 5:]
    stop_at = int((row0 == eos).nonzero()[0])
    assert (row0[stop_at:] == eos).all(), "a finished row keeps emitting its stop token"
    # without pad_token_id, a row repeats the stop token that ended it
    own = generate(ours, prompt, 10, eos_token_id=[255, eos])
    assert torch.equal(own, out)


def test_left_padded_batch_equals_single_prompts_and_transformers(pair):
    hf, ours = pair
    a, b = ids(1, 7, seed=5)[0], ids(1, 3, seed=6)[0]
    batch = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])  # (2, 7), row 1 left padded
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    out = generate(ours, batch, 8, attention_mask=mask)
    assert torch.equal(out[0, 7:], generate(ours, a[None], 8)[0, 7:])
    assert torch.equal(out[1, 7:], generate(ours, b[None], 8)[0, 3:]), "padding must not change a row"
    assert torch.equal(out, hf_greedy(hf, batch, 8, attention_mask=mask))
    assert torch.equal(out, generate(ours, batch, 8, attention_mask=mask, use_cache=False))
    built = left_pad([a.tolist(), b.tolist()], pad_token_id=0)
    assert torch.equal(built[0], batch) and torch.equal(built[1], mask), "left_pad builds the same batch"


@pytest.mark.parametrize("rows", [[], [[1, 2], []]])
def test_left_pad_refuses_no_prompt_or_an_empty_one(rows):
    with pytest.raises(ValueError, match="empty"):
        left_pad(rows, pad_token_id=0)


def test_use_cache_false_equals_true(pair):
    _, ours = pair
    prompt = ids(2, 4, seed=7)
    assert torch.equal(generate(ours, prompt, 10, use_cache=False), generate(ours, prompt, 10))
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(generate(ours, prompt, 10, temperature=1.0, top_k=50, generator=g(), use_cache=False),
                       generate(ours, prompt, 10, temperature=1.0, top_k=50, generator=g()))


# ---------------------------------------------------------------- sampling


def test_top_k_1_and_tiny_top_p_are_greedy(pair):
    _, ours = pair
    prompt = ids(3, 4, seed=8)
    greedy = generate(ours, prompt, 8)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(generate(ours, prompt, 8, temperature=1.3, top_k=1, generator=gen), greedy)
    assert torch.equal(generate(ours, prompt, 8, temperature=1.3, top_p=1e-6, generator=gen), greedy)


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    prompt = ids(2, 4, seed=9)
    run = lambda seed: generate(ours, prompt, 10, temperature=1.0, top_p=0.9,
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1)), "different seeds should give different samples"


def test_temperature_shapes_the_distribution():
    z = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    n = 40_000
    for tau in (0.5, 1.0, 2.0):
        draws = sample_next(z.expand(n, 5), tau, generator=torch.Generator().manual_seed(0))
        freq = torch.bincount(draws, minlength=5) / n
        assert (freq - (z[0] / tau).softmax(-1)).abs().max() < 0.01, f"tau={tau}: draws do not follow softmax(z/tau)"
    cold = sample_next(z.expand(n, 5), 0.2, generator=torch.Generator().manual_seed(0))
    hot = sample_next(z.expand(n, 5), 5.0, generator=torch.Generator().manual_seed(0))
    assert (cold == 0).float().mean() > 0.99 and (hot == 0).float().mean() < 0.35


def test_temperature_changes_generated_text(pair):
    _, ours = pair
    prompt = ids(1, 4, seed=10).expand(64, 4)  # the same prompt 64 times
    first = lambda tau: generate(ours, prompt, 1, temperature=tau, generator=torch.Generator().manual_seed(0))[:, -1]
    assert first(0.05).unique().numel() < first(3.0).unique().numel()


def test_filters():
    z = torch.tensor([[3.0, 2.2, 1.8, 1.2, 0.9, 0.5, 0.0, -0.5]])
    p = z.softmax(-1)[0]
    kept = filter_top_k(z, 3)
    assert torch.isfinite(kept).sum() == 3 and torch.equal(kept[0, :3], z[0, :3])
    for top_p in (0.3, 0.5, 0.66, 0.85, 0.99):
        n = int(torch.isfinite(filter_top_p(z, top_p)).sum())
        assert p[:n].sum() >= top_p and (n == 1 or p[:n - 1].sum() < top_p), f"top_p={top_p}: kept {n}"
    assert torch.equal(filter_top_p(z, 1.0), z)
    shuffled = z[:, torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])]
    assert torch.isfinite(filter_top_p(shuffled, 0.7)).nonzero()[:, 1].tolist() == [1, 3, 4], "vocabulary order kept"
    with pytest.raises(ValueError, match="top_k"):
        filter_top_k(z, 0)
    with pytest.raises(ValueError, match="top_p"):
        filter_top_p(z, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(z, -1.0)


def test_stop_tokens_mark_rows_and_repeat_their_token():
    stops = StopTokens([7, 9], batch_size=3)
    assert torch.equal(stops(torch.tensor([1, 7, 2])), torch.tensor([1, 7, 2])) and not stops.all_done
    assert torch.equal(stops(torch.tensor([9, 4, 2])), torch.tensor([9, 7, 2])), "row 1 is done: it repeats 7"
    assert stops.done.tolist() == [True, True, False] and not stops.all_done
    assert torch.equal(stops(torch.tensor([5, 5, 7])), torch.tensor([9, 7, 7])) and stops.all_done
    padded = StopTokens(7, batch_size=2, pad_token_id=0)
    padded(torch.tensor([7, 3]))
    assert torch.equal(padded(torch.tensor([4, 4])), torch.tensor([0, 4])), "with pad_token_id, finished rows pad"
    none = StopTokens(None, batch_size=2)
    assert torch.equal(none(torch.tensor([7, 9])), torch.tensor([7, 9])) and not none.all_done, "no stop tokens"


# ---------------------------------------------------------------- streaming


def test_stream_generate_yields_the_tokens_of_generate(pair):
    _, ours = pair
    prompt = ids(2, 5, seed=11)
    steps = list(stream_generate(ours, prompt, 9, eos_token_id=3))
    assert all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.cat([prompt] + [s[:, None] for s in steps], 1), generate(ours, prompt, 9, eos_token_id=3))


# ---------------------------------------------------------------- limits and errors


def test_limits_name_max_position_embeddings(pair):
    _, ours = pair  # max_position_embeddings = 256
    for use_cache in (True, False):
        with pytest.raises(ValueError, match="max_position_embeddings=256"):
            generate(ours, ids(1, 250), 10, use_cache=use_cache)
        with pytest.raises(ValueError, match="longer than the context window, max_position_embeddings=256"):
            generate(ours, ids(1, 300), 1, use_cache=use_cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        stream_generate(ours, ids(1, 250), 10)  # raises at the call, before any next()
    assert generate(ours, ids(1, 250), 6).shape == (1, 256), "exactly filling the window is fine"


def test_bad_arguments_raise_value_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="empty prompt"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, ids(1, 3), 0)
    with pytest.raises(ValueError, match="input_ids"):
        generate(ours, ids(1, 3)[0], 2)
    with pytest.raises(ValueError, match="LEFT"):
        generate(ours, ids(2, 3), 2, attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        generate(ours, ids(2, 3), 2, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(ours, ids(1, 3), 2, eos_token_id="<|im_end|>")
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, ids(1, 3), 2, temperature=1.0, top_p=1.5)


# ---------------------------------------------------------------- chat


class Scripted(torch.nn.Module):
    """Stands in for a trained model: whatever the prompt, it 'predicts' the next token of `reply`."""

    def __init__(self, reply):
        super().__init__()
        self.config = Qwen3Config(vocab_size=151_936, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                                  max_position_embeddings=4096)
        self.reply, self.weight, self.prompts = reply, torch.nn.Parameter(torch.zeros(1)), []

    def forward(self, input_ids, attention_mask=None, kv_cache=None, last_only=False):
        if kv_cache.pos == 0:
            self.prompts.append(input_ids[0].tolist())
        n = kv_cache.pos + input_ids.shape[1] - len(self.prompts[-1])
        kv_cache.advance(input_ids.shape[1])
        logits = torch.full((input_ids.shape[0], 1, self.config.vocab_size), float("-inf"))
        logits[:, :, self.reply[min(n, len(self.reply) - 1)]] = 0.0
        return logits


def test_chat_session_splits_thinking_and_keeps_history(tok):
    model = Scripted(tok.encode("<think>\nLet me think: 2+2.\n</think>\n\nIt is 4, café 東京.<|im_end|>"))
    session = ChatSession(model, tok, system="Be brief.", temperature=0)
    pieces = list(session.stream("What is 2+2?"))
    assert {c for c, _ in pieces} == {"thinking", "answer"}
    reply = session.last_reply
    assert reply.thinking == "Let me think: 2+2." and reply.answer == "It is 4, café 東京." and reply.finished
    assert "".join(t for c, t in pieces if c == "answer").strip() == reply.answer
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    model.reply = tok.encode("Yes.<|im_end|>")
    session.enable_thinking = False
    assert session.send("Sure?", display=False).answer == "Yes."
    second = tok.decode(model.prompts[-1])
    assert "It is 4, café 東京." in second and "Let me think" not in second, "earlier thinking is dropped"
    assert second.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert second.endswith("<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_chat_session_sampling_defaults_follow_the_mode(tok):
    session = ChatSession(Scripted([0]), tok)
    assert session.sampling() == RECOMMENDED_SAMPLING[True] == dict(temperature=0.6, top_k=20, top_p=0.95)
    session.enable_thinking = False
    assert session.sampling() == dict(temperature=0.7, top_k=20, top_p=0.8)
    assert ChatSession(Scripted([0]), tok, temperature=0).sampling()["temperature"] == 0


def test_chat_session_stopped_early_and_out_of_tokens(tok):
    model = Scripted(tok.encode("<think>\nhmm hmm hmm hmm hmm hmm"))
    session = ChatSession(model, tok, max_new_tokens=6, temperature=0)
    reply = session.send("go", display=False)
    assert not reply.finished and len(reply.token_ids) == 6 and reply.answer == "" and reply.thinking
    stream = session.stream("again")
    next(stream)
    stream.close()  # the caller stops listening: both turns are still recorded
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2


def test_chat_session_context_overflow(tok):
    model = Scripted([0])
    model.config.max_position_embeddings = 16
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        ChatSession(model, tok).stream("a long message " * 10)


def test_print_stream_marks_thinking():
    import io
    out = io.StringIO()
    shown = print_stream([("thinking", "hmm"), ("answer", "Hi"), ("answer", "!")], file=out)
    assert out.getvalue() == "<think>\nhmm\n</think>\n\nHi!\n" and shown == {"thinking": "hmm", "answer": "Hi!"}


# ---------------------------------------------------------------- hardening: clear errors, and caches that fit
def test_token_ids_outside_the_vocabulary_are_named(pair):
    _, ours = pair  # vocab_size = 256
    bad = ids(2, 5)
    bad[1, 3] = 256
    with pytest.raises(ValueError, match=r"input_ids\[1, 3\] = 256 is not a token id of this model "
                                         r"\(vocab_size=256: ids 0\.\.255\)"):
        generate(ours, bad, 2)
    bad[1, 3] = -1
    with pytest.raises(ValueError, match=r"input_ids\[1, 3\] = -1"):
        stream_generate(ours, bad, 2)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), "0.7"])
def test_temperature_must_be_a_finite_number(pair, temperature):
    _, ours = pair
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        generate(ours, ids(1, 3), 2, temperature=temperature)


@pytest.mark.parametrize("mask", [[[0.5, 1.0, 1.0]], [[2, 1, 1]], [[-1, 1, 1]]])
def test_attention_mask_values_must_be_0_or_1(pair, mask):
    _, ours = pair
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 \(padding\) and 1 \(tokens\)"):
        generate(ours, ids(1, 3), 2, attention_mask=torch.tensor(mask))


def test_eos_ids_as_tensors_and_numpy_integers(pair):
    np = pytest.importorskip("numpy")
    _, ours = pair
    prompt = ids(2, 4)
    stop = int(generate(ours, prompt, 3)[0, -1])  # row 0's third new token
    expected = generate(ours, prompt, 8, eos_token_id=[stop])
    for eos in (torch.tensor([stop]), np.int64(stop), [np.int32(stop)]):
        assert torch.equal(generate(ours, prompt, 8, eos_token_id=eos), expected), repr(eos)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(ours, prompt, 2, eos_token_id=torch.tensor([1.5]))


def test_the_plain_cache_grows_in_blocks_and_is_freed(pair, monkeypatch):
    """A reply that stops after one token must not have allocated the cache for max_new_tokens."""
    import gc
    import importlib
    import weakref
    gen_mod = importlib.import_module("qwen3_scratch.generate")  # the module, not the function of that name
    from qwen3_scratch.kv_cache import KVCache
    import dataclasses
    from qwen3_scratch.model import Qwen3Model
    _, ours = pair
    model = Qwen3Model(Qwen3Config(**dict(dataclasses.asdict(ours.config), max_position_embeddings=100_000))).eval()
    model.load_state_dict(ours.state_dict(), strict=True)
    made, real = [], KVCache.for_model.__func__
    monkeypatch.setattr(KVCache, "for_model", classmethod(lambda cls, *a, **k: made.append(real(cls, *a, **k))
                                                          or made[-1]))
    prompt = ids(1, 5)
    first = int(generate(model, prompt, 1)[0, -1])
    out = generate(model, prompt, 90_000, eos_token_id=first)
    assert out.shape == (1, 6)
    assert made[-1].k.shape[3] <= gen_mod.KV_BLOCK and made[-1].max_len == 90_005, "allocated a block, not 90,005"
    ref = weakref.ref(made.pop())
    gc.collect()
    assert ref() is None, "the cache is freed once generation is over"
    monkeypatch.setattr(gen_mod, "KV_BLOCK", 3)  # grow several times: the same tokens as without a cache
    assert torch.equal(generate(model, ids(2, 4), 12), generate(model, ids(2, 4), 12, use_cache=False))
