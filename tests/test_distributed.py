"""Tests for chapter 16 (qwen3_scratch.distributed, .tensor_parallel, .data_parallel): 2 CPU processes over gloo, each
mode compared with the single-process result. Every test starts its own processes on 127.0.0.1 and stops them."""
import dataclasses
import io
import json
import multiprocessing
import os

import pytest
import torch

from qwen3_scratch import data_parallel as DP
from qwen3_scratch import distributed as D
from qwen3_scratch import tensor_parallel as TP
from qwen3_scratch.cli import main as cli_main
from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.generate import generate
from qwen3_scratch.kv_cache import KVCache
from qwen3_scratch.weights import save_pretrained

DENSE = Qwen3Config(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
MOE = dataclasses.replace(DENSE, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=32, tie_word_embeddings=False)
PROMPT = [[3, 14, 15, 92, 65, 35], [8, 979, 32, 38, 46, 26]]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    assert not multiprocessing.active_children(), "a test left processes running"


def test_collectives_match_one_process():
    demo = D.run_processes(D.collectives_demo, world_size=2)
    xs = [d["x"] for d in demo]
    total = xs[0] + xs[1]
    for rank, d in enumerate(demo):
        assert torch.equal(d["all_reduce"], total)
        assert torch.equal(d["all_gather"], torch.cat(xs))
        assert torch.equal(d["reduce_scatter"], total.chunk(2)[rank])


def test_run_processes_reports_the_failing_rank_and_stops_the_others():
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed in fail_on_rank_1(.|\n)*rank 1 gives up"):
        D.run_processes(D.fail_on_rank_1, world_size=2, timeout=60)
    assert not multiprocessing.active_children()


def test_run_processes_refuses_functions_it_cannot_import():
    fn = lambda: None  # noqa: E731
    fn.__module__ = "__main__"
    import sys
    main = sys.modules["__main__"]
    had, saved = hasattr(main, "__file__"), getattr(main, "__file__", None)
    if had:
        del main.__file__
    try:
        with pytest.raises(ValueError, match="cannot import"):
            D.run_processes(fn)
    finally:
        if had:
            main.__file__ = saved


def test_ring_bytes():
    n = 1000
    assert D.ring_bytes("all_reduce", n, 2) == n  # 2 (N-1)/N n with N = 2
    assert D.ring_bytes("all_gather", n, 4) == D.ring_bytes("reduce_scatter", n, 4) == 750
    assert D.ring_bytes("all_reduce", n, 1) == 0
    with pytest.raises(ValueError, match="all_to_all"):
        D.ring_bytes("all_to_all", n, 2)


def test_memory_rows_use_chapter_7_counts():
    rows = {r["model"]: r for r in D.memory_rows(("8B", "30B-A3B"), devices=8)}  # 235B's count takes long
    r = rows["8B"]
    assert r["params_b"] == pytest.approx(8.19, abs=0.01) and r["tp"] == 8
    assert r["train_ddp"] == pytest.approx(8 * r["infer_bf16"]) and r["train_fsdp"] == pytest.approx(r["train_ddp"] / 8)
    moe = rows["30B-A3B"]
    assert moe["tp"] == 8 and moe["kv_copies"] == 2, "4 KV heads at TP 8: each replicated on 2 ranks"
    assert moe["active_b"] == pytest.approx(3.35, abs=0.05)
    assert moe["infer_bf16_tp"] > moe["infer_bf16"] / 8, "the replicated k/v projections are counted"


@pytest.mark.parametrize("tp", [3, 8])
def test_tp_degree_must_divide_heads_and_divide_or_multiply_kv_heads(tp):
    with pytest.raises(ValueError, match=rf"degree {tp} .*num_attention_heads \(4\) .*num_key_value_heads \(2\) "
                                         r"or be a multiple of it.*choose one of \[1, 2, 4\]"):
        TP.check_tp_degree(DENSE, tp)
    TP.check_tp_degree(DENSE, 2)
    TP.check_tp_degree(DENSE, 4)  # 2 KV heads, each replicated on 2 ranks
    with pytest.raises(ValueError, match=r"degree 4 .*num_key_value_heads \(3\)"):  # 4 is no multiple of 3
        TP.check_tp_degree(dataclasses.replace(DENSE, num_attention_heads=12, num_key_value_heads=3), 4)
    with pytest.raises(ValueError, match=r"num_experts \(3\)"):
        TP.check_tp_degree(dataclasses.replace(MOE, num_experts=3), 2)


@pytest.mark.parametrize("cfg, tp", [(DENSE, 2), (MOE, 2), (DENSE, 4)], ids=["dense", "moe", "dense-tp4-kv-replicated"])
def test_tensor_parallel_matches_one_process(cfg, tp):
    ref = TP.random_model(cfg, seed=0)
    with torch.no_grad():
        logits = ref(torch.tensor(PROMPT))
    tokens = generate(ref, torch.tensor(PROMPT), 8)
    cache = KVCache.for_model(ref, len(PROMPT), len(PROMPT[0]) + 8).nbytes()
    for r in D.run_processes(TP.tp_generate_check, cfg, 0, PROMPT, 8, world_size=tp):
        torch.testing.assert_close(r["logits"], logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(r["tokens"], tokens)
        kv_heads = cfg.num_key_value_heads // tp or 1  # past K each rank holds one replicated KV head
        assert r["cache_bytes"] * cfg.num_key_value_heads == cache * kv_heads


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp_dense")
    save_pretrained(TP.random_model(dataclasses.replace(DENSE, vocab_size=151_936), seed=1), folder)
    return str(folder)


def test_generate_tp_2_under_torchrun_prints_what_one_process_prints(tiny_checkpoint):
    argv = ["generate", "--model", tiny_checkpoint, "--prompt", "Hello there", "--max-new-tokens", "6"]
    one = io.StringIO()
    assert cli_main(argv, stdout=one) == 0
    two = D.run_torchrun(["-m", "qwen3_scratch", *argv, "--tp", "2"], nproc=2, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.getvalue() and one.getvalue().strip()


def test_generate_tp_refusals(tiny_checkpoint):
    argv = ["generate", "--model", tiny_checkpoint, "--prompt", "Hi", "--max-new-tokens", "2"]
    for extra, expect in ((["--tp", "3"], "num_attention_heads (4) and either divide num_key_value_heads (2)"),
                          (["--tp", "2"], "torchrun --nproc_per_node 2"),
                          (["--tp", "2", "--prompt", "-"], "--prompt TEXT")):
        err = io.StringIO()
        assert cli_main(argv + extra, stdout=io.StringIO(), stderr=err, stdin=io.StringIO("x")) == 1
        assert expect in err.getvalue(), err.getvalue()


# ---- data parallel and fully sharded training (chapter 12's loop) ----

def _small_run():
    from qwen3_scratch.trainer import TrainConfig
    from qwen3_scratch.pretrain import tiny_config
    cfg = tiny_config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64)
    tcfg = TrainConfig(steps=4, batch_size=8, seq_len=32, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=10**6,
                       seed=0, autocast="none")
    return cfg, tcfg, DP.synthetic_tokens(cfg.vocab_size, 2048)


@pytest.fixture(scope="module")
def one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg, tcfg, tokens = _small_run()
    try:
        return DP.train_parallel("none", cfg, tcfg, tokens)
    finally:
        torch.set_num_threads(threads)


def test_rank_batches_split_the_global_batch():
    x = torch.arange(8)[:, None].expand(8, 3)
    parts = [DP.RankBatches(lambda split, step: (x, x + 1), r, 2)("train", 0) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(parts[1][1], x[4:] + 1)
    with pytest.raises(ValueError, match="8 rows does not split evenly over 3"):
        DP.RankBatches(lambda split, step: (x, x), 0, 3)("train", 0)


def test_ddp_reproduces_the_one_process_loss_curve(one_process):
    cfg, tcfg, tokens = _small_run()
    ddp = D.run_processes(DP.train_parallel, "ddp", cfg, tcfg, tokens, world_size=2, timeout=180)
    assert one_process["losses"][-1] < one_process["losses"][0]
    for r in ddp:
        assert r["losses"] == pytest.approx(one_process["losses"], abs=1e-4)
        assert r["bytes"] == one_process["bytes"]  # a full replica on every rank


def test_fsdp_reproduces_the_loss_curve_with_half_the_state(one_process):
    cfg, tcfg, tokens = _small_run()
    fsdp = D.run_processes(DP.train_parallel, "fsdp", cfg, tcfg, tokens, world_size=2, timeout=180)
    full = sum(one_process["bytes"].values())
    for r in fsdp:
        assert r["losses"] == pytest.approx(one_process["losses"], abs=1e-4)
        assert sum(r["bytes"].values()) == pytest.approx(full / 2, rel=0.02)
        assert r["bytes"]["params"] < 0.51 * one_process["bytes"]["params"]


def test_fsdp_sharded_checkpoint_resumes_and_exports(one_process, tmp_path):
    from qwen3_scratch.weights import load_pretrained
    cfg, tcfg, tokens = _small_run()
    first = D.run_processes(DP.train_parallel, "fsdp", cfg, tcfg, tokens, world_size=2, timeout=180,
                            fn_kwargs=dict(stop_at=2, save_dir=str(tmp_path / "ckpt")))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors",
        "training_state.json"]
    second = D.run_processes(DP.train_parallel, "fsdp", cfg, tcfg, tokens, world_size=2, timeout=180,
                             fn_kwargs=dict(resume_dir=str(tmp_path / "ckpt"), export_dir=str(tmp_path / "hub")))
    assert second[0]["start"] == 2
    assert first[0]["losses"] + second[0]["losses"] == pytest.approx(one_process["losses"], abs=1e-4)
    model = load_pretrained(tmp_path / "hub", device="cpu")
    assert model.config == cfg


def test_train_command_under_torchrun_ddp(tmp_path):
    """torchrun train and one-process train write the same files and the same validation loss, and a DDP run's
    training state is chapter 12's own (one process resumes it)."""
    from qwen3_scratch.weights import load_pretrained
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n" * 30)
    out, alone = tmp_path / "run", tmp_path / "alone"
    argv = [str(a) for a in ("--text", text, "--steps", 3, "--batch-size", 4, "--seq-len", 16, "--eval-every", 2,
                             "--hidden-size", 64, "--layers", 1, "--vocab-size", 300)]
    res = D.run_torchrun(["-m", "qwen3_scratch", "train", "--out", str(out), *argv], nproc=2, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert DP.main(["--out", str(alone), *argv]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in alone.iterdir())
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, alone))
    assert ours["processes"] == 2 and ours["strategy"] == "ddp"
    assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-4)
    assert [h["loss"] for h in ours["history"]["val"]] == pytest.approx([h["loss"] for h in theirs["history"]["val"]],
                                                                        abs=1e-4)
    assert load_pretrained(out, device="cpu").config.num_hidden_layers == 1
    assert DP.main(["--out", str(out), *argv[:2], "--steps", "4", *argv[4:], "--resume"]) == 0, \
        "one process resumes a DDP run"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_train_command_without_torchrun(tmp_path, capsys):
    assert DP.main(["--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--strategy", "fsdp"]) == 2
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err
    assert DP.main(["--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2  # chapter 12's
    assert "missing.txt: no such file" in capsys.readouterr().err


def test_a_torchrun_worker_ends_without_the_interpreters_teardown(tmp_path):
    """`python -m qwen3_scratch` under torchrun flushes its output and leaves with os._exit: the teardown after the
    atexit handlers aborted 4 of 162 FSDP `train` runs on a loaded 2-core CPU (status -6 after a finished run).
    Outside torchrun the exit is the ordinary one."""
    import subprocess
    import sys
    script = ("import atexit, sys; from qwen3_scratch.__main__ import exit_now_if_torchrun_worker as leave\n"
              "atexit.register(lambda: print('teardown ran', flush=True))\n"
              "sys.stdout.write('buffered output'); leave(3); sys.exit(5)\n")
    worker = dict(zip(D.TORCHRUN_VARS, ("1", "2", "1", "127.0.0.1", "29500")))  # what torchrun sets
    for extra, status, teardown in [(worker, 3, False), ({}, 5, True)]:
        env = {k: v for k, v in os.environ.items() if k not in worker} | extra
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert res.returncode == status, (extra, res.stderr[-2000:])
        assert res.stdout.startswith("buffered output"), "the output is flushed before os._exit"
        assert ("teardown ran" in res.stdout) == teardown, (extra, res.stdout)
