"""Chapter 12's training benchmark (lab/train_bench.py): every variant trains as the eager step does (the compiled
one through aot_eager, which runs Dynamo and AOTAutograd without generating code, so it takes seconds), the command
writes only where asked, bad arguments get one line. No timing is asserted: timings on a shared CI machine are noise."""
import json

import pytest
import torch

from qwen3_scratch.lab import train_bench as tb
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.pretrain import init_weights
from qwen3_scratch.trainer import TrainConfig


@pytest.fixture(scope="module")
def tiny(one_thread):
    cfg, B, T = tb.bench_shape("tiny")
    return init_weights(Qwen3Model(cfg), seed=0), *tb.fixed_batch(cfg, B, T, "cpu")


def test_every_variant_trains_the_same(tiny):
    model, x, y = tiny
    torch._dynamo.reset()
    # transformers compiled is left to the command's own check (same_training row): compiling it doubles this test
    variants = [v for v in tb.VARIANTS if v != "transformers: compiled + fused AdamW"]
    pairs = {v: tb.make_step(v, model, x, y, tb.bench_train_config(), backend="aot_eager") for v in variants}
    check = tb.training_check(pairs, n=3)
    assert tb.same_training(check), check
    assert check["ours: eager + fused AdamW"]["weight_diff_max"] > 0, "the fused kernel really ran (other rounding)"
    losses = check[tb.VARIANTS[0]]["losses"]
    assert losses[-1] < losses[0], "three steps on one batch lower its loss"


def test_the_check_can_fail(tiny):
    """A different learning rate or a different batch is not the same training."""
    model, x, y = tiny
    pairs = {"ref": tb.make_step(tb.VARIANTS[0], model, x, y, tb.bench_train_config()),
             "lr x2": tb.make_step(tb.VARIANTS[1], model, x, y, tb.bench_train_config(lr=6e-3)),
             "other batch": tb.make_step(tb.VARIANTS[1], model, y, x, tb.bench_train_config())}
    check = tb.training_check(pairs, n=2)
    assert tb.same_training({"ref": check["ref"]})
    assert not tb.same_training({"lr x2": check["lr x2"]}) and not tb.same_training({"b": check["other batch"]})


def test_command_writes_only_where_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = tb.main(["--quick", "--no-profile", "--repeats", "2", "--warmup", "0", "--out", str(tmp_path / "o")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"], "no figure unless --figures"
    saved = json.loads((tmp_path / "o" / "train_bench_cpu.json").read_text())
    assert saved["meta"]["device_name"] and saved["meta"]["cpu_threads"] == 1
    assert saved["meta"]["variants"] == [v for v in tb.VARIANTS if "compiled" not in v], "--quick: compile off"
    rows = [r for r in saved["rows"] if r["metric"] == "tokens_per_second"]
    assert len(rows) == 3 and all(r["min"] <= r["q1"] <= r["value"] <= r["q3"] <= r["max"] for r in rows)
    assert any(r["metric"] == "speedup" for r in saved["rows"]) and res["rows"] == saved["rows"]
    assert [r["value"] for r in saved["rows"] if r["metric"] == "same_training"] == [1]


def test_bench_train_dispatches(tmp_path, monkeypatch):
    from qwen3_scratch.lab.bench_run import main as bench_main
    monkeypatch.setattr(tb, "run_train_bench", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("dispatched")))
    with pytest.raises(RuntimeError, match="dispatched"):
        bench_main(["--train", "--quick", "--out", str(tmp_path)])


@pytest.mark.parametrize("argv, culprit", [(["--repeats", "0"], "--repeats"), (["--threads", "0"], "--threads"),
                                           (["--warmup", "-1"], "--warmup"), (["--shapes", "huge"], "--shapes")])
def test_bad_arguments_one_line(argv, culprit, capsys):
    with pytest.raises(SystemExit) as e:
        tb.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m qwen3_scratch bench --train: error:") and culprit in err


def test_unknown_shape_and_variant_are_refused(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        tb.bench_shape("huge")
    with pytest.raises(ValueError, match="unknown variant 'ours: jit'"):
        tb.make_step("ours: jit", model, x, y, TrainConfig())
