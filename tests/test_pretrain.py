"""Tests for chapter 12: the vendored corpus, the trained tokenizer (ours, tokenizers and transformers agree),
the training loop (accumulation, resume, activation checkpointing, MoE aux loss), the `train` CLI's outputs and
one-line errors, and the shipped checkpoint against transformers (same logits, same greedy tokens)."""
import dataclasses
import json
import math

import pytest
import torch

from qwen3_scratch import pretrain
from qwen3_scratch.corpus import (CORPUS_FILE, SPECIAL_TOKENS, VALIDATION_PLAYS, load_plays, save_tokenizer,
                                  split_plays, train_tokenizer)
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.trainer import (IGNORE_INDEX, load_checkpoint, lr_at, make_optimizer, next_token_loss,
                                   save_checkpoint, set_activation_checkpointing, train, train_step, TrainConfig)
from qwen3_scratch.pretrain import init_weights, split_texts, tiny_config, TokenBatches
from qwen3_scratch.tokenizer import Qwen3Tokenizer


@pytest.fixture(scope="module")
def plays():
    return load_plays()


@pytest.fixture(scope="module")
def tok_dir(plays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer([plays["lear"], plays["othello"]], vocab_size=600), folder)
    return folder


def test_corpus_split_by_whole_plays(plays):
    train, val = split_plays(plays)
    assert len(plays) == 37 and set(val) == set(VALIDATION_PLAYS) and not set(train) & set(val)
    assert 0.08 < sum(map(len, val.values())) / sum(map(len, plays.values())) < 0.12
    assert "gutenberg" not in "".join(plays.values()).lower()


def test_corpus_checksum_is_checked(tmp_path):
    bad = tmp_path / CORPUS_FILE.name
    bad.write_bytes(CORPUS_FILE.read_bytes()[:-1] + b"\0")
    with pytest.raises(Exception):
        load_plays(bad)  # a corrupted xz stream does not decode


def test_tokenizer_matches_transformers_and_chat_template(tok_dir, plays):
    from transformers import AutoTokenizer
    ours, hf = Qwen3Tokenizer(tok_dir), AutoTokenizer.from_pretrained(tok_dir)
    assert ours.vocab_size == 600 and [ours.special_tokens[s] for s in SPECIAL_TOKENS] == list(range(5))
    text = plays["hamlet"][:3000] + " naïve 日本 🙂 <think>x</think>"
    assert ours.encode(text) == hf.encode(text) and ours.decode(ours.encode(text)) == text
    assert "<think>" in ours.decode(ours.encode("<think>"), skip_special_tokens=True)  # added, not special
    chat = [{"role": "system", "content": "Speak."}, {"role": "user", "content": "Who's there?"}]
    assert ours.apply_chat_template(chat, tokenize=True) == list(
        hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_split_texts_rules():
    assert split_texts(["a", "b", "c"]) == (["a", "b"], ["c"])
    tr, va = split_texts(["x"] * 25)
    assert len(va) == 2 and len(tr) == 23
    text = "".join(f"line {i}\n" for i in range(100))
    tr, va = split_texts([text])
    assert tr[0] + va[0] == text and tr[0].endswith("\n") and 0.05 < len(va[0]) / len(text) < 0.15


def test_loss_ignores_masked_targets_and_schedule():
    logits = torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y2 = y.clone(); y2[0, :3] = IGNORE_INDEX
    keep = y2 != IGNORE_INDEX
    assert torch.allclose(next_token_loss(logits, y2), torch.nn.functional.cross_entropy(logits[keep], y[keep]))
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and max(lrs) == 1.0 and abs(lrs[-1] - 0.1) < 1e-3
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])), "cosine decays monotonically"


def _small(seed=3, **over):
    return init_weights(Qwen3Model(tiny_config(300, num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                               num_key_value_heads=1, intermediate_size=96, **over)), seed=seed)


@pytest.fixture(scope="module")
def stream():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 300, (5000,), generator=g, dtype=torch.int32)


def test_resume_is_bit_exact(stream, tmp_path):
    cfg = TrainConfig(steps=5, batch_size=2, seq_len=16, warmup_steps=2)
    batches = TokenBatches(stream, stream[:200], cfg.batch_size, cfg.seq_len)
    a = _small(); opt, sch = make_optimizer(a, cfg)
    train(a, opt, sch, batches, cfg, log=None, progress=False)
    b = _small(); opt, sch = make_optimizer(b, cfg)
    hist = train(b, opt, sch, batches, TrainConfig(**{**cfg.__dict__, "steps": 2}), log=None, progress=False)
    save_checkpoint(tmp_path, b, opt, sch, 2, cfg, hist)
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.bin")), "no pickles"
    modes = {f.name: f.stat().st_mode & 0o777 for f in tmp_path.iterdir()}
    assert len(set(modes.values())) == 1, f"model, state and config files share one mode: {modes}"
    c = _small(seed=99); opt, sch = make_optimizer(c, cfg)
    meta = load_checkpoint(tmp_path, c, opt, sch)
    train(c, opt, sch, batches, cfg, start_step=meta["step"], history=meta["history"], log=None, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_activation_checkpointing_same_gradients_less_saved(stream):
    cfg = TrainConfig(batch_size=2, seq_len=32)
    x, y = TokenBatches(stream, stream, 2, 32)("train", 0)

    def grads_and_saved(ckpt):
        m = _small()
        set_activation_checkpointing(m, ckpt)
        params = {p.data_ptr() for p in m.parameters()}
        saved = []
        def pack(t):
            if t.data_ptr() not in params:
                saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = next_token_loss(m(x), y)
        loss.backward()
        return [p.grad for p in m.parameters()], sum(saved)
    (g1, s1), (g2, s2) = grads_and_saved(False), grads_and_saved(True)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2)) and s2 < s1 / 2


def test_moe_step_adds_balancing_loss(stream):
    m = _small(moe=True)
    cfg = TrainConfig(batch_size=2, seq_len=16, warmup_steps=1)
    opt, sch = make_optimizer(m, cfg)
    stats = train_step(m, opt, sch, TokenBatches(stream, stream, 2, 16), 0, cfg)
    assert stats["aux_loss"] >= 2 - 1e-3 and math.isfinite(stats["loss"])  # top_k=2: balanced scores 2


def _cli(argv, capsys):
    status = pretrain.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


SMALL = ["--steps", "3", "--vocab-size", "300", "--hidden-size", "64", "--layers", "1", "--seq-len", "32",
         "--batch-size", "2", "--eval-every", "2", "--device", "cpu"]


def test_cli_trains_writes_and_resumes(plays, tmp_path, capsys):
    files = []
    for name in ("lear", "othello", "macbeth"):
        files.append(tmp_path / f"{name}.txt")
        files[-1].write_text(plays[name][:20000])
    out = tmp_path / "run"
    status, stdout, err = _cli(["--text", *map(str, files), "--out", str(out), *SMALL], capsys)
    assert status == 0, err
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and m["train_tokens"] > m["val_tokens"] > 0 and m["val_loss"] > 0
    assert "\r" not in err, "no progress bar when stderr is not a terminal"
    status, _, err = _cli(["--text", *map(str, files), "--out", str(out), *SMALL[2:], "--steps", "5", "--resume"],
                          capsys)
    assert status == 0, err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5


@pytest.mark.parametrize("case", ["missing", "empty", "latin1", "short", "nonempty_out", "resume_nothing"])
def test_cli_bad_input_one_line_nothing_written(case, tmp_path, capsys):
    text, out = tmp_path / "t.txt", tmp_path / "out"
    text.write_text("Now is the winter of our discontent\n" * 200)
    argv = ["--text", str(text), "--out", str(out), *SMALL]
    if case == "missing":
        argv[1] = str(tmp_path / "nope.txt")
    elif case == "empty":
        text.write_text("  \n")
    elif case == "latin1":
        text.write_bytes("Fair Verona, café\n".encode("latin-1"))
    elif case == "short":
        text.write_text("To be.\n")
    elif case == "nonempty_out":
        out.mkdir(); (out / "keep.txt").write_text("mine")
    elif case == "resume_nothing":
        argv.append("--resume")
    status, stdout, err = _cli(argv, capsys)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert {"missing": "nope.txt", "empty": "empty", "latin1": "UTF-8", "short": "too short",
            "nonempty_out": "not empty", "resume_nothing": "resume"}[case] in err
    if case == "nonempty_out":
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()


def test_shipped_checkpoint_matches_transformers():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from qwen3_scratch.generate import generate
    from qwen3_scratch.weights import load_pretrained
    folder = pretrain.SHIPPED_MODEL
    ours = load_pretrained(folder, dtype=torch.float32, device="cpu")
    # transformers' default attention (SDPA), the kernel ours calls too: the logits agree to the bit on the CPUs we
    # tried; its eager attention differs by a few fp32 roundings (7.6e-6 here, close to the 1e-5 bound)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok, hf_tok = Qwen3Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    prompt = "KING.\nWhat news from France?"
    ids = torch.tensor([tok.encode(prompt)])
    assert ids[0].tolist() == hf_tok.encode(prompt)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5
    mine = generate(ours, ids, 20)
    theirs = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None, min_new_tokens=20)
    assert mine.tolist() == theirs.tolist()
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["train_config"] == dataclasses.asdict(TrainConfig()) and metrics["parameters"] == sum(
        p.numel() for p in ours.parameters()), "the shipped model is the default run"
    assert metrics["val_loss"] < metrics["baselines"]["bigram"]["val_loss"] < metrics["baselines"]["unigram"]["val_loss"], \
        "the shipped model beats the bigram, which beats the unigram"
