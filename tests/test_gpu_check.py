"""tools/gpu_check.sh, the GPU check of issue 7, tested where there is no GPU: `--cpu-smoke` runs its steps on a CPU
with a tiny shape (a random checkpoint in the Hugging Face cache layout, loaded offline through the Hub resolver;
plain / fast / transformers decode at batch 1 and 2; chapter 21's Triton kernels in Triton's interpreter beside SDPA)
and must write the results files."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_cpu_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "QWEN3_SCRATCH_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "bench_cuda.json").read_text())
    assert results["meta"]["device"] == "cpu" and "Qwen3-0.6B" in results["meta"]["weights"]
    speed = {(r["variant"], r["context"]) for r in results["rows"] if r["metric"] == "tokens_per_second"}
    assert {p for p, _ in speed} >= {"ours: plain generate (ch. 9)", "ours: fast path, eager", "transformers: generate"}
    assert {b for _, b in speed} == {1, 2}, "batch 1 and batch 2"
    same = [r["value"] for r in results["rows"] if r["metric"] == "same_tokens_as_plain"]
    assert same and all(v == 1 for v in same), "in fp32 every path must give plain greedy's tokens"
    assert (tmp_path / "bench_cuda.csv").read_text().startswith("device,")
    if importlib.util.find_spec("triton") is None:
        assert "chapter 21's kernel step skipped" in done.stdout
        return
    flash = json.loads((tmp_path / "flash_cuda.json").read_text())  # chapter 21's kernels, in Triton's interpreter
    assert flash["meta"]["device"] == "cpu" and flash["meta"]["interpreted"]
    rows = {(r["experiment"], r["metric"], r["variant"], r["context"]): r["value"] for r in flash["rows"]}
    assert rows[("flash_check", "as_accurate_as_sdpa", "ours: triton", 64)] == 1
    prefill = {(v, T) for e, m, v, T in rows if e == "flash_prefill" and m == "tflops"}
    assert {T for _, T in prefill} == {64, 128} and {v for v, _ in prefill} >= {"ours: triton"} and len(prefill) == 4
    assert {e for e, *_ in rows} == {"flash_check", "flash_prefill", "flash_decode"}


def test_gpu_check_refuses_unknown_arguments_and_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0, "syntax error in gpu_check.sh"
    done = subprocess.run(["bash", str(SCRIPT), "--gpu-please"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "usage" in done.stderr
