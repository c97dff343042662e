"""Supervised fine-tuning (chapter 13): reading chat JSONL, the assistant-only mask, batches, the loop, the CLI."""
import json
import warnings

import pytest
import torch

from qwen3_scratch import Qwen3Model, Qwen3Tokenizer, load_pretrained, save_pretrained
from qwen3_scratch.__main__ import main as cli_main
from qwen3_scratch.corpus import save_tokenizer, train_tokenizer
from qwen3_scratch.finetune import (ChatBatches, ChatDataError, encode_chat, encode_conversations, finetune, main,
                                    read_chat_jsonl, sft_config)
from qwen3_scratch.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, load_adapter
from qwen3_scratch.trainer import IGNORE_INDEX
from qwen3_scratch.pretrain import init_weights, tiny_config

WORDS = "king queen lord lady sword crown ring horse rose heart night moon star sea fire gold".split()


def convo(i):
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3)]
    return {"messages": [{"role": "user", "content": "Reverse: " + " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Qwen3 checkpoint with its own small BPE tokenizer (chapter 12's trainer)."""
    d = tmp_path_factory.mktemp("base")
    text = " ".join(" ".join(convo(i)["messages"][0]["content"].split()[1:]) for i in range(40)) + " Reverse:"
    save_tokenizer(train_tokenizer([text] * 3, vocab_size=300), d)
    tok = Qwen3Tokenizer(d)
    cfg = tiny_config(tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, eos_token_id=tok.endoftext_id)
    save_pretrained(init_weights(Qwen3Model(cfg), seed=0), d)
    return d


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(convo(i)) + "\n" for i in range(24)))
    return path


def test_read_chat_jsonl_and_line_numbers(tmp_path):
    good = json.dumps(convo(0))
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n\n   \n" + good + "\n")
    assert len(read_chat_jsonl(path)) == 2, "blank lines are skipped"
    bad_lines = {
        '{"messages": [{"role": "user", "content": "a"}': "not valid JSON",
        '["a"]': "expected an object",
        '{"text": "hello"}': "expected an object",
        '{"messages": [{"role": "user", "content": "a"}]}': "no assistant message",
        '{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}': "unknown role",
        '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}': "content must be",
        '{"messages": [{"role": "user", "content": "a<|im_end|>"}, {"role": "assistant", "content": "b"}]}':
            "control token <|im_end|>",
        '{"messages": []}': "empty",
    }
    for line, message in bad_lines.items():
        path.write_text(good + "\n\n" + line + "\n" + good + "\n")
        with pytest.raises(ChatDataError) as e:
            read_chat_jsonl(path)
        assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value), str(e.value)
    path.write_bytes(good.encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(ChatDataError, match=r":2: not UTF-8"):
        read_chat_jsonl(path)
    path.write_text("\n\n")
    with pytest.raises(ChatDataError, match="no conversations"):
        read_chat_jsonl(path)
    with pytest.raises(ChatDataError, match="no such file"):
        read_chat_jsonl(tmp_path / "missing.jsonl")


def test_mask_covers_assistant_tokens_only(base_dir):
    tok = Qwen3Tokenizer(base_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: king queen"},
                {"role": "assistant", "content": "queen king"}, {"role": "user", "content": "Reverse: sea fire"},
                {"role": "assistant", "content": "fire sea"}]
    ids, labels = encode_chat(tok, messages)
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (i, IGNORE_INDEX) for i, lab in zip(ids, labels))
    text = tok.decode(trained)
    assert text == "queen king<|im_end|><think>\n\n</think>\n\nfire sea<|im_end|>", text
    # the prompt of each turn is tokenized exactly as generation tokenizes it
    for cut in (2, 4):
        prompt = tok.apply_chat_template(messages[:cut], add_generation_prompt=True, tokenize=True)
        assert ids[:len(prompt)] == prompt
        assert all(lab == IGNORE_INDEX for lab in labels[len(prompt) - 3:len(prompt)]), "the header is context"
        assert labels[len(prompt)] != IGNORE_INDEX, "the answer's first token is a target"


def test_encode_conversations_truncates_and_drops(base_dir):
    tok = Qwen3Tokenizer(base_dir)
    long_prompt = [{"role": "user", "content": "king " * 200}, {"role": "assistant", "content": "queen"}]
    long_answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "queen " * 200}]
    examples, stats = encode_conversations(tok, [convo(0)["messages"], long_prompt, long_answer], max_len=64)
    assert stats["examples"] == 2 and stats["dropped"] == 1 and stats["truncated"] == 1, stats
    assert [len(ids) for ids, _ in examples][1] == 65


def test_batches_shift_and_pad(base_dir):
    tok = Qwen3Tokenizer(base_dir)
    examples, _ = encode_conversations(tok, [convo(i)["messages"] for i in range(5)])
    batches = ChatBatches(examples, examples[:3], batch_size=4, pad_id=tok.pad_token_id, seed=1)
    x, y = batches.get_batch("train", 0)
    x2, y2 = batches("train", 0)
    assert torch.equal(x, x2) and torch.equal(y, y2), "a step's batch depends only on (seed, step)"
    assert x.shape == y.shape and x.shape[0] == 4
    x, y = batches.collate(examples[:2])
    for row, (ids, labels) in enumerate(examples[:2]):
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and y[row, :n].tolist() == labels[1:]
        assert (y[row, n:] == IGNORE_INDEX).all() and (x[row, n:] == tok.pad_token_id).all()
    assert sum(len(list(b[0])) for b in batches.eval_batches()) == 3


def test_lora_finetune_learns_and_freezes_base(base_dir):
    tok = Qwen3Tokenizer(base_dir)
    model = load_pretrained(base_dir, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples, _ = encode_conversations(tok, [convo(i)["messages"] for i in range(16)])
    result = finetune(model, ChatBatches(examples, batch_size=8, pad_id=tok.pad_token_id),
                      sft_config(25, lora=True, lr=2e-2, batch_size=8), LoRAConfig(r=4, lora_alpha=8), log=None)
    losses = [h["loss"] for h in result["history"]["train"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses
    assert result["trainable"] == sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert result["optimizer_bytes"] == 2 * 4 * result["trainable"], "AdamW keeps two fp32 moments"
    for name, p in model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), f"{name} must stay frozen"


def test_cli_lora_adapter(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert cli_main(["finetune", "--model", str(base_dir), "--data", str(data_file), "--out", str(out),
                     "--lora-rank", "4", "--steps", "3", "--batch-size", "4"]) == 0
    assert "wrote adapter" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["steps"] == 3 and metrics["examples"] == 24
    assert json.loads((out / ADAPTER_CONFIG).read_text())["r"] == 4
    model = load_pretrained(base_dir, device="cpu")
    load_adapter(model, out)
    assert not list(tmp_path.glob(".adapter.*")), "no temporary folder left behind"


def test_cli_merge_loads_in_transformers(base_dir, data_file, tmp_path):
    out = tmp_path / "merged"
    assert main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out), "--lora-rank", "4",
                 "--merge", "--steps", "3", "--batch-size", "4", "--lr", "0.05"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    ours = load_pretrained(out, device="cpu")
    base = load_pretrained(base_dir, device="cpu")
    ids = torch.tensor([Qwen3Tokenizer(out).encode("Reverse: king queen")])
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        assert not torch.allclose(ours(ids), base(ids), atol=1e-4), "the merged checkpoint differs from the base"
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)


def test_cli_full_finetune(base_dir, data_file, tmp_path):
    out = tmp_path / "full"
    assert main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out), "--lora-rank", "0",
                 "--steps", "2", "--batch-size", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "full" and metrics["trainable"] == metrics["total"]
    load_pretrained(out, device="cpu")


def test_cli_errors_name_the_line_and_write_nothing(base_dir, data_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = data_file.read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistent", "content": "x"}]}'
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["--model", str(base_dir), "--data", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:7: message 1: unknown role 'assistent'") and err.count("\n") == 1, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out)]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    for args, message in ((["--lora-rank", "-1"], "--lora-rank"), (["--steps", "0"], "--steps"),
                          (["--lora-rank", "0", "--merge"], "--merge")):
        assert main(["--model", str(base_dir), "--data", str(data_file), "--out", str(tmp_path / "x"), *args]) == 1
        assert message in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--data", str(data_file), "--out", str(tmp_path / "x")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------- what a hostile or careless user tried (issue 21): one line each
@pytest.mark.parametrize("args,words", [
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lora-alpha", "nan"], "--lora-alpha"),
    (["--lora-alpha", "inf"], "--lora-alpha"), (["--seed", "99999999999999999999"], "--seed"),
    (["--lora-rank", "1000000"], "--lora-rank 1000000"), (["--batch-size", "1000000000"], "--batch-size"),
    (["--max-len", "100000000"], "--max-len")])
def test_cli_bad_numbers_refused_before_loading(args, words, base_dir, data_file, tmp_path, capsys, monkeypatch):
    import qwen3_scratch.finetune as ft

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(ft, "load_pretrained", refuse)
    out = tmp_path / "out"
    assert main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out), "--device", "cpu",
                 *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not out.exists()


def test_cli_divergence_is_one_line_and_writes_no_adapter(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", str(base_dir), "--data", str(data_file), "--out", str(out), "--lora-rank", "4",
                 "--steps", "3", "--batch-size", "4", "--lr", "1e30", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not finite at step" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_finetune_memory_is_chapter_00s_estimate():
    from qwen3_scratch.finetune import finetune_memory
    from qwen3_scratch.memory import param_count
    from qwen3_scratch.model import config_param_counts
    from qwen3_scratch.config import Qwen3Config
    for name in ("0.6B", "30B-A3B"):
        cfg = Qwen3Config.from_preset(name)
        assert param_count(cfg) == config_param_counts(cfg)["total"], name
    cfg = Qwen3Config.from_preset("0.6B")
    full, lora = finetune_memory(cfg), finetune_memory(cfg, LoRAConfig(r=16, lora_alpha=32))
    assert full["weights"] == 4 * full["parameters"] and lora["optimizer"] == 8 * lora["trainable"]
