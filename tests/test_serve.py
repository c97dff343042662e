"""Tests for chapter 17's engine without HTTP (qwen3_scratch.paged, .scheduler, .engine, server.TextStream):
block bookkeeping and prefix caching, a ragged paged batch equal to each row alone, the engine equal to
generate() token for token (with a roomy pool and with one small enough to force waiting and preemption),
seeded sampling independent of the batch, stop tokens, and the text stream's thinking split and stop strings."""
import pytest
import torch

from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.engine import LLMEngine
from qwen3_scratch.generate import generate
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.paged import BlockManager, PagedKVCache
from qwen3_scratch.scheduler import SamplingParams, Scheduler, Sequence
from qwen3_scratch.server import TextStream
from qwen3_scratch.tokenizer import Qwen3Tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
    model = Qwen3Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # varied greedy continuations, not one token repeated
    return model


@pytest.fixture(scope="module")
def tok():
    return Qwen3Tokenizer()


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1024, (n,), generator=g).tolist() for n in lengths]


def test_block_manager_bookkeeping():
    bm = BlockManager(num_blocks=6, block_size=4)
    t = []
    assert bm.allocate(t, list(range(9))) == 0 and len(t) == 3 and bm.num_used == 3
    assert bm.grow(t, 12) and len(t) == 3, "12 tokens still fit in 3 blocks"
    assert bm.grow(t, 13) and len(t) == 4
    assert not bm.grow(t, 40) and len(t) == 4 and bm.num_free == 2, "a failed grow must change nothing"
    assert bm.allocate([], list(range(20))) is None and bm.num_used == 4, "a failed allocate must change nothing"
    bm.free_table(t)
    assert t == [] and bm.num_used == 0
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_prefix_cache_shares_reuses_and_evicts():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = [], []
    bm.allocate(a, list(range(12)))
    bm.register(a, list(range(12)), 12)
    # the same 12 tokens: the block with the last token is recomputed, so 2 blocks (8 tokens) are hits
    assert bm.allocate(b, list(range(12))) == 8 and b[:2] == a[:2] and b[2] != a[2]
    assert [bm.blocks[i].ref_count for i in a[:2]] == [2, 2]
    bm.free_table(a)
    assert bm.num_used == 3, "shared blocks stay in use while b holds them"
    bm.free_table(b)
    c = []
    assert bm.allocate(c, list(range(8)) + [7, 7]) == 8, "freed blocks are found again by hash"
    e = []
    assert bm.allocate(e, [99] + list(range(1, 12))) == 0, "a different first block breaks the chain"
    bm.free_table(c)
    bm.free_table(e)
    # hand every block out with new contents: the old hashes must be forgotten, not served stale
    d = []
    assert bm.allocate(d, [5] * 24) == 0 and bm.num_free == 0
    bm.free_table(d)
    assert bm.allocate([], list(range(12))) == 0, "an overwritten block must not be a prefix-cache hit"


def test_paged_batch_equals_each_row_alone(model):
    ps = prompts([5, 17, 3, 12])
    pool, bm = PagedKVCache.for_model(model, 32, 4), BlockManager(32, 4)
    tables = [[] for _ in ps]
    for t, p in zip(tables, ps):
        bm.allocate(t, p)
    T = max(map(len, ps))
    with torch.no_grad():
        view = pool.view(tables, [0] * 4, [len(p) for p in ps])
        ids = torch.tensor([[0] * (T - len(p)) + p for p in ps])
        got = model(ids, position_ids=view.position_ids, attention_mask=view.attention_mask, kv_cache=view,
                    last_only=True)[:, -1]
        want = torch.stack([model(torch.tensor([p]))[0, -1] for p in ps])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        nxt = got.argmax(-1)
        for t, p in zip(tables, ps):
            bm.grow(t, len(p) + 1)
        view = pool.view(tables, [len(p) for p in ps], [1] * 4)
        got = model(nxt[:, None], position_ids=view.position_ids, attention_mask=view.attention_mask,
                    kv_cache=view, last_only=True)[:, -1]
        want = torch.stack([model(torch.tensor([p + [int(n)]]))[0, -1] for p, n in zip(ps, nxt)])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def alone(model):
    ps = prompts([5, 17, 33, 8, 40, 3, 21, 16])
    ps += [ps[4][:32] + p[:3] for p in ps[:3]]  # share 4 full blocks with prompt 4
    return ps, [generate(model, torch.tensor([p]), 16)[0, len(p):].tolist() for p in ps]


@pytest.mark.parametrize("num_blocks", [100, 9])
def test_engine_equals_generate(model, alone, num_blocks):
    ps, want = alone
    engine = LLMEngine(model, num_blocks=num_blocks, block_size=8, max_batch=8)
    seqs = [engine.add(p, SamplingParams(max_tokens=16, temperature=0)) for p in ps]
    while engine.has_work():
        engine.step()
    assert [s.token_ids[s.prompt_len:] for s in seqs] == want
    assert all(s.finish_reason == "length" for s in seqs) and engine.blocks.num_used == 0
    if num_blocks == 9:  # 9 blocks hold two of these sequences at most: the rest waited or were preempted
        assert sum(s.preemptions for s in seqs) > 0 and max(r["running"] for r in engine.trace) < 8
    else:
        assert engine.blocks.hit_tokens >= 3 * 32, "the shared 32-token prefix should come from the cache"


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    p = prompts([7])[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    alone = LLMEngine(model, 50, 8, 4).run([(p, params)])[0]
    crowd = LLMEngine(model, 50, 8, 4).run([(q, SamplingParams(max_tokens=10, temperature=1.0)) for q in prompts([3, 9, 30])]
                                          + [(p, params)])[-1]
    assert alone == crowd


def test_stop_token_and_impossible_requests(model):
    p = prompts([6])[0]
    first = generate(model, torch.tensor([p]), 1)[0, -1].item()
    engine = LLMEngine(model, 20, 8, 4, max_model_len=64)
    out = engine.run([(p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(first,)))])
    assert out == [[first]] and engine.blocks.num_used == 0
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add(p, SamplingParams(max_tokens=60))
    with pytest.raises(ValueError, match="KV pool"):
        LLMEngine(model, 2, 8, 4).add(p, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_scheduler_preempts_newest_and_everyone_finishes():
    sched = Scheduler(BlockManager(6, 4), max_batch=4)
    seqs = [Sequence([i] * 6, SamplingParams(max_tokens=6, temperature=0)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        _, batch = sched.schedule()
        assert batch, "the scheduler must make progress"
        for s in batch:
            s.num_computed = len(s.token_ids)
            s.token_ids.append(0)
            if s.num_generated == 6:
                sched.finish(s, "length")
    assert [s.num_generated for s in seqs] == [6, 6, 6] and seqs[2].preemptions > 0 and seqs[0].preemptions == 0


def test_text_stream_thinking_and_stop_strings(tok):
    ts = TextStream(tok, stop=["END"], chat=True)
    ids = [tok.think_id] + tok.encode("\nHmm.\n") + [tok.end_think_id] + tok.encode("\n\nHi EN") + tok.encode("D x")
    pieces = [p for t in ids for p in ts.put(t)] + ts.flush()
    assert "".join(t for c, t in pieces if c == "reasoning") == "Hmm.\n"
    assert "".join(t for c, t in pieces if c == "content") == "Hi " and ts.stopped
    plain = TextStream(tok, stop=["zz"], chat=False)  # a held-back near-miss comes out at the end
    pieces = [p for t in tok.encode("abc z") + [tok.im_end_id] for p in plain.put(t)] + plain.flush()
    assert "".join(t for _, t in pieces) == "abc z" and not plain.stopped
