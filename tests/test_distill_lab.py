"""Tests for chapter 19's experiment and commands, on a tiny random teacher (the real runs are the notebook's quick
mode and the full run): the four students train on equal tokens, the on-policy student branches off the off-policy
one, the shipped folders hold a transformers-loadable checkpoint and metrics.json with val_loss, train_tokens and
the teacher's folder, the figures draw, the time estimate adds up, and both commands refuse bad input by name."""
import dataclasses
import json
import shutil

import pytest
import torch

from qwen3_scratch import distill_cli
from qwen3_scratch.lab import student_plots as distill_plots
from qwen3_scratch.lab import students as distill_lab
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.pretrain import init_weights, SHIPPED_MODEL, tiny_config
from qwen3_scratch.weights import save_pretrained


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """A random 2 x 64 Qwen3 with the shipped 4,096-token tokenizer: the lab's shapes without its cost."""
    cfg = tiny_config(4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    folder = save_pretrained(init_weights(Qwen3Model(cfg), seed=0), tmp_path_factory.mktemp("teacher"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHIPPED_MODEL / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def data():
    from qwen3_scratch.tokenizer import Qwen3Tokenizer
    return distill_lab.load_data(Qwen3Tokenizer(SHIPPED_MODEL))


def _settings(teacher, **over):
    return dataclasses.replace(distill_lab.SETTINGS["quick"], tokens=4 * 2 * 32, batch_size=2, seq_len=32,
                               eval_every=2, eval_tokens=256, final_val_tokens=512, calib_windows=2,
                               sample_prompts=2, prompt_tokens=8, top_k=8, teacher=str(teacher), **over)


def test_run_ship_and_figures(tiny_teacher, data, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM
    res = distill_lab.run(_settings(tiny_teacher), device="cpu", log=None, data=data)
    assert set(res["runs"]) == set(distill_lab.KINDS) and res["train_tokens"] == 4 * 2 * 32
    hist = {k: res["runs"][k][0]["history"] for k in distill_lab.KINDS}
    assert [v["tokens"] for v in hist["scratch"]["val"]] == [0, 128, 256], "every student on the same budget"
    assert hist["onpolicy"]["val"][:2] == hist["distilled"]["val"][:2], "the on-policy run branches off at step 3"
    assert hist["onpolicy"]["val"][2] != hist["distilled"]["val"][2]
    assert hist["onpolicy"]["train"][2] == hist["distilled"]["train"][2]
    assert hist["onpolicy"]["train"][3]["ce"] is None and hist["distilled"]["train"][3]["ce"] is not None
    assert res["prune"]["kept_layers"] in ([0], [1]) and res["student_config"]["hidden_size"] == 32
    assert res["cache"]["teacher_tokens"] <= 2 * 4 * 2 * 32, "the pruned student reuses the distilled one's windows"
    written = distill_lab.ship(res, tmp_path / "students", tiny_teacher, log=None)
    assert [p.name for p in written] == ["scratch", "distilled", "pruned"]
    m = json.loads((tmp_path / "students" / "distilled" / "metrics.json").read_text())
    assert m["train_tokens"] == 256 and m["teacher"] == str(tiny_teacher) and m["val_loss"] == pytest.approx(
        res["runs"]["distilled"][0]["val_loss"], abs=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "students" / "pruned", dtype=torch.float32).eval()
    x = torch.randint(0, 4096, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, res["_models"]["pruned"].eval()(x), rtol=0, atol=1e-5)
    path = distill_lab.save_results(res, tmp_path / "out", tmp_path / "figs", quick=True, log=None)
    loaded = json.loads(path.read_text())  # what the notebook reads back from the committed run
    assert "_models" not in loaded and loaded["summary"] == distill_lab.summarize(loaded)
    for fig in (distill_plots.plot_curves(loaded), distill_plots.plot_layer_importance(loaded["prune"]),
                distill_plots.plot_channel_importance(loaded["prune"], loaded["student_config"])):
        assert fig.axes
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "19_channel_importance.png", "19_layer_importance.png", "19_students.png"]


def test_estimate_adds_up(tiny_teacher):
    s = _settings(tiny_teacher, seeds=(0, 1))
    costs = {"scratch": 1.0, "offpolicy_cached": 1.0, "offpolicy_recompute": 3.0, "onpolicy": 4.0,
             "teacher_per_token": 0.0, "student_eval_per_token": 0.0, "train_stream_tokens": 10_000,
             "teacher_layers": 2}
    est = distill_lab.estimate_seconds(s, costs)
    assert est["train"] == 2 * 4 * (1 + 2 * 1 + 0.25 * 4) and est["total"] == est["train"]
    assert distill_lab.budget_for(s, costs, minutes=est["total"] / 60) == s.tokens


def test_lab_cli_refuses(tmp_path, capsys):
    assert distill_lab.main(["--teacher", str(tmp_path / "nope"), "--quick"]) == 2
    assert "nope" in capsys.readouterr().err
    assert distill_lab.main(["--quick", "--tokens", "10"]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_distill_cli(tiny_teacher, tmp_path, capsys, one_thread):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question.\n" * 300)
    args = ["--teacher", str(tiny_teacher), "--text", str(tmp_path / "a.txt"), "--steps", "4", "--batch-size", "2",
            "--seq-len", "32", "--top-k", "8", "--prompt-tokens", "8", "--device", "cpu"]
    assert distill_cli.main([*args, "--prune-half", "--mode", "both", "--out", str(tmp_path / "s")]) == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["train_tokens"] == 4 * 64 and [r["ce"] is None for r in m["history"]["train"]] == [False] * 3 + [True]
    assert distill_cli.main([*args, "--prune-half", "--out", str(tmp_path / "s")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    other = tiny_config(512, hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)
    save_pretrained(Qwen3Model(other), tmp_path / "small_vocab")
    assert distill_cli.main([*args, "--student", str(tmp_path / "small_vocab"), "--out", str(tmp_path / "t")]) == 2
    assert "vocabulary (512) differs from the teacher's (4096)" in capsys.readouterr().err


def test_shipped_students_load_in_transformers_and_the_taught_ones_beat_scratch(one_thread):
    """Chapter 19's full run ships three 4 x 192 students: transformers reads each folder and computes the same
    logits; their metrics.json name the shipped teacher and one token budget; on every seed the distilled and the
    pruned students beat the scratch one; and the distilled student's validation loss is that of its file."""
    from transformers import AutoModelForCausalLM
    from qwen3_scratch.pretrain import TEACHER_MODEL, TokenBatches
    from qwen3_scratch.tokenizer import Qwen3Tokenizer
    from qwen3_scratch.trainer import evaluate
    from qwen3_scratch.utils import package_dir
    from qwen3_scratch.weights import load_pretrained
    root, metrics, models = package_dir().resolve().parent, {}, {}
    for name in distill_lab.SHIPPED_KINDS:
        folder = package_dir() / "data" / "students" / name
        ours = models[name] = load_pretrained(folder, dtype=torch.float32, device="cpu")
        c = ours.config
        assert (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads) == (4, 192, 1), name
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
        ids = torch.tensor([Qwen3Tokenizer(folder).encode("KING.\nWhat news from France?")])
        with torch.no_grad():
            assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-5, name
        m = metrics[name] = json.loads((folder / "metrics.json").read_text())
        assert (root / m["teacher"]).resolve() == TEACHER_MODEL.resolve(), name
        assert not list(folder.glob("training_state*")), name
    assert len({m["train_tokens"] for m in metrics.values()}) == 1, "one token budget for every student"
    for name in ("distilled", "pruned"):
        assert metrics[name]["seeds"]["vs_scratch"]["max"] < 0, f"{name} must beat scratch on every seed"
        assert metrics[name]["val_loss"] < metrics["scratch"]["val_loss"], name
    data = distill_lab.load_data(Qwen3Tokenizer(TEACHER_MODEL))
    val = TokenBatches(data["train"], data["val"], 8, metrics["distilled"]["settings"]["seq_len"])
    loss, _ = evaluate(models["distilled"], val.eval_batches(None))
    assert abs(loss - metrics["distilled"]["val_loss"]) < 1e-4, (loss, metrics["distilled"]["val_loss"])
