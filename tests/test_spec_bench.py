"""Chapter 20's experiment (qwen3_scratch/spec_bench.py) in its quick settings on tiny checkpoints written here: it
runs end to end, writes the JSON and the figures only where asked, keeps greedy tokens equal to the target's, and
refuses a draft with another tokenizer in one line."""
import json
import shutil

import pytest
import torch

from qwen3_scratch.config import Qwen3Config
from qwen3_scratch.model import Qwen3Model
from qwen3_scratch.lab.spec_bench import main, predicted_speedup
from qwen3_scratch.utils import package_dir
from qwen3_scratch.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: one torch thread
SHIPPED = package_dir() / "data" / "shakespeare" / "model"


def checkpoint(folder, seed, layers, hidden, tokenizer=True):
    """A random Qwen3 with the shipped Shakespeare tokenizer (4,096 tokens), saved in the Hub's layout."""
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=hidden // 2, max_position_embeddings=256)).eval()
    save_pretrained(model, folder)
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(SHIPPED / name, folder / name)
    return str(folder)


def test_quick_run_writes_results_and_figures_where_asked(tmp_path, capsys):
    target = checkpoint(tmp_path / "target", 0, 2, 64)
    small = checkpoint(tmp_path / "small", 1, 1, 32)
    out = tmp_path / "out"
    results = main(["--quick", "--target", target, "--draft", f"small={small}", "--draft", f"itself={target}",
                    "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["20_acceptance.png", "20_speed.png", "speculative_cpu.json"]
    saved = json.loads((out / "speculative_cpu.json").read_text())
    assert saved["meta"]["device_name"].startswith("CPU") and saved["meta"]["cpu_threads"] == 1
    assert {r["draft"] for r in saved["acceptance"]} == {"small", "itself"}
    itself = [r for r in saved["acceptance"] if r["draft"] == "itself" and r["temperature"] == 0]
    assert all(r["per_token_acceptance"] == 1.0 for r in itself), "the target as its own draft is always right"
    assert all(r["tokens_per_target_forward"] > 1 for r in itself)
    greedy = [r for r in results["speed"] if r["temperature"] == 0]
    assert greedy and all(r["same_tokens"] for r in greedy), "greedy speculative runs must give the target's tokens"
    assert {r["draft"] for r in results["speed"]} == {"alone", "small", "itself"}
    assert "tok/s" in capsys.readouterr().out


def test_cost_model():
    costs = {"target": {1: {"median": 10.0}, 3: {"median": 15.0}}, "draft": {1: {"median": 1.0}}}
    # 2 draft steps (2) + a 3-token check (15) = 17 for 2.5 tokens, against 10 per token alone
    assert predicted_speedup(2.5, 2, costs, "draft") == pytest.approx(25 / 17)


def test_another_tokenizer_or_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    target = checkpoint(tmp_path / "target", 0, 1, 32)
    other = checkpoint(tmp_path / "other", 1, 1, 32, tokenizer=False)  # falls back to Qwen's own tokenizer
    assert main(["--quick", "--target", target, "--draft", f"other={other}", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: draft other") and "tokenizer differs" in err and err.count("\n") == 1
    assert main(["--quick", "--target", target, "--draft", f"gone={tmp_path / 'gone'}", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o").exists(), "nothing is written when the run cannot start"
