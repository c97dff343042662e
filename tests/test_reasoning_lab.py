"""Chapter 18's lab: the targets are read the right way round, no evaluation problem is ever trained on, the figures
draw from results read back from JSON, bad arguments are one-line errors, and the shipped checkpoints are what the
chapter says (Hub layout, transformers' logits and chat template, the full run's targets met)."""
import json

import pytest
import torch

from qwen3_scratch.lab.reasoning import LabConfig, fresh_sets, grpo_tasks, held_out, main, targets, with_changes
from qwen3_scratch.reasoning import OPS, draw_problems, prompt_ids
from qwen3_scratch.utils import package_dir

SHIPPED = package_dir() / "data" / "reasoning"
RESULTS = package_dir().parent / "results" / "18_thinking.json"
pytestmark = pytest.mark.usefixtures("one_thread")


def _acc(x):
    return {"all": {"mean": x, "std": 0.0, "per_seed": [x]}}


def test_targets_read_the_right_way_round():
    check = {"sft": {"think": _acc(0.60)}, "rl": {"think": _acc(0.86), "no_think": _acc(0.03), "budget 0": _acc(0.0)}}
    t = targets(check)
    assert all(met for _, _, met in t.values()), t
    assert t["final minus cold start (thinking)"][0] == pytest.approx(0.26)
    check["sft"]["think"] = _acc(0.83)  # the cold start already as good: GRPO and fusion did not earn 5 points
    check["rl"]["no_think"] = _acc(0.70)
    t = targets(check)
    assert [met for _, _, met in t.values()] == [True, False, False, True]


def test_no_evaluation_problem_is_ever_trained_on():
    cfg = LabConfig(eval_per_op=20, scaling_problems=30)
    base = set(draw_problems(500, seed=cfg.seed))
    evals = held_out(cfg, base)
    assert not evals & base and len(evals) >= 2 * 20 * len(cfg.eval_seeds)
    drawn = {}
    tasks = grpo_tasks(_Tok(), cfg, base | evals, drawn)
    for step in range(40):
        tasks(step)
    assert not {p for probs in drawn.values() for p in probs} & evals, "GRPO never draws a held-out problem"
    sets = fresh_sets((1, 2), 10, exclude=base | evals)
    assert [sum(p.op == op for p in s) for s in sets for op in OPS] == [10] * 4 and not set(sum(sets, [])) & base


class _Tok:  # grpo_tasks only renders prompts
    def apply_chat_template(self, messages, **kwargs):
        return [0]


def test_figures_draw_from_results_read_back_from_json(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from qwen3_scratch.lab.reasoning_plots import FIGURES
    stage = {key: {"mean": 0.5, "std": 0.1, "per_seed": [0.4, 0.6]} for key in ("all", *OPS)}
    scaling = {"k": [1, 2, 4], "pass": [0.5, 0.7, 0.8], "majority": [0.5, 0.5, 0.6], "temperature": 1.0}
    res = {"sft": {"think": stage, "no_think": stage}, "grpo": {"think": stage},
           "final": {"think": stage, "no_think": stage}, "budget": {"0": stage, "64": stage},
           "scaling_sft": scaling, "scaling_final": scaling,
           "grpo_history": [{"step": i, "reward": 0.5, "reply_tokens": 100, "kl": 0.01, "reward +": 0.8,
                             "reward *": 0.2} for i in range(3)]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    res = json.loads(path.read_text())
    for name, make in FIGURES.items():
        fig = make(res)
        assert fig.axes, name
        matplotlib.pyplot.close(fig)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["--threads", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --threads must be >= 1, got 0\n"
    assert main(["--cold-start", str(tmp_path / "nowhere"), "--out", str(tmp_path)]) == 2
    assert "no checkpoint there (config.json missing)" in capsys.readouterr().err
    assert main(["--set", "grpo.stepz=3", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: --set 'grpo.stepz=3': expected FIELD=VALUE")
    assert not list(tmp_path.iterdir()), "nothing written before the arguments are checked"


def test_publish_copies_a_finished_run_only(tmp_path, monkeypatch, capsys):
    import qwen3_scratch.lab.reasoning as lab
    run, root = tmp_path / "run", tmp_path / "checkout"
    assert main(["--publish", str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --publish {run}: not a finished run")
    for stage in ("sft", "rl"):
        (run / stage).mkdir(parents=True)
        (run / stage / "metrics.json").write_text("{}")
    (run / "figures").mkdir()
    (run / "figures" / "18_budget.png").write_bytes(b"png")
    (run / "results.json").write_text('{"targets": {}}')
    (root / "results").mkdir(parents=True)
    (root / "figures").mkdir()
    monkeypatch.setattr(lab, "SHIPPED", root / "data" / "reasoning")
    assert lab.publish(run, root) == 0
    assert (root / "data" / "reasoning" / "rl" / "metrics.json").is_file()
    assert (root / "results" / "18_thinking.json").read_text() == '{"targets": {}}'
    assert (root / "figures" / "18_budget.png").read_bytes() == b"png"


def test_set_changes_fields_by_their_type():
    cfg = with_changes(LabConfig(), ["grpo.steps=60", "budgets=0,32", "fusion_cut=0.25", "grpo.filter_groups=true"])
    assert (cfg.grpo.steps, cfg.budgets, cfg.fusion_cut, cfg.grpo.filter_groups) == (60, (0, 32), 0.25, True)
    assert LabConfig().grpo.steps == 40, "the defaults are untouched"
    with pytest.raises(ValueError, match="steps takes a int"):
        with_changes(cfg, ["grpo.steps=many"])
    with pytest.raises(ValueError, match="GRPOConfig.steps must be >= 1"):
        with_changes(cfg, ["grpo.steps=0"])


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_shipped_checkpoints_load_in_transformers(stage):
    import warnings
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen3_scratch.tokenizer import Qwen3Tokenizer
    from qwen3_scratch.weights import load_pretrained
    folder = SHIPPED / stage
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json"):
        assert (folder / name).is_file(), f"{folder / name} is missing"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["transformers"]["think"]["all"]["per_seed"], "metrics.json carries the transformers check"
    hf_tok, tok = AutoTokenizer.from_pretrained(folder), Qwen3Tokenizer(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_pretrained(folder, device="cpu")
    for p in draw_problems(4, seed=5):
        for thinking in (True, False):
            ids = hf_tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=True,
                                             add_generation_prompt=True, enable_thinking=thinking)["input_ids"]
            assert ids == prompt_ids(tok, p, thinking), "the saved template renders as ours"
        with torch.no_grad():
            x = torch.tensor([ids])
            assert (hf(x).logits - ours(x)).abs().max() < 1e-4


@pytest.mark.skipif(not RESULTS.is_file(), reason="results/18_thinking.json is in a checkout only")
def test_the_full_run_met_its_targets():
    """The shipped run is the default command's: LabConfig's settings, its own cold start (none loaded), all four
    targets met in the transformers check."""
    import dataclasses
    res = json.loads(RESULTS.read_text())
    assert res["config"] == json.loads(json.dumps(dataclasses.asdict(LabConfig()))), "the shipped run used other settings"
    assert "loaded_from" not in res["sft_train"] and res["sft_train"]["seconds"] > 0, "the run trained its cold start"
    assert all(met for _, _, met in res["targets"].values()), res["targets"]


@pytest.mark.skipif(not RESULTS.is_file(), reason="results/18_thinking.json is in a checkout only")
def test_the_shipped_run_recorded_every_stage():
    res = json.loads(RESULTS.read_text())
    assert len(res["targets"]) == 4 and res["command"].startswith("python -m qwen3_scratch reasoning-lab")
    for stage in ("sft", "grpo", "final"):
        assert len(res[stage]["think"]["all"]["per_seed"]) == len(res["config"]["eval_seeds"]) >= 3
