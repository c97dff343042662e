"""Running a chapter never changes what the course ships (figures/, results/, the package's checkpoints): a notebook
executed as CI runs it writes its figures into the scratch folder (`QWEN3_SCRATCH_RUNS`), and every file that git
tracks keeps its bytes and its modification time. Only `QWEN3_SCRATCH_PUBLISH=1` writes into the course."""
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def tracked_state() -> tuple[dict, str]:
    """({tracked path: (mtime_ns, size)}, `git status --porcelain` for tracked files)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    stamps = {}
    for name in filter(None, names.split("\0")):
        st = (ROOT / name).stat() if (ROOT / name).exists() else None
        stamps[name] = (st.st_mtime_ns, st.st_size) if st else None
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    return stamps, status


@pytest.fixture
def checkout():
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")


def test_running_chapter_10_leaves_the_checkout_unchanged(checkout, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3_SCRATCH_QUICK", "1")  # as CI runs it
    monkeypatch.setenv("QWEN3_SCRATCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("QWEN3_SCRATCH_PUBLISH", raising=False)
    monkeypatch.delenv("QWEN3_SCRATCH_SAVE_FIGURES", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    stamps, status = tracked_state()
    nb = nbformat.read(ROOT / "notebooks" / "10_attention_viz.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}
                   ).execute()
    after_stamps, after_status = tracked_state()
    written = sorted(n for n, s in stamps.items() if after_stamps.get(n) != s)
    assert not written, f"running chapter 10 wrote tracked files: {written}"
    assert after_status == status, f"git status changed:\n{status}\n->\n{after_status}"
    drawn = sorted(p.name for p in (tmp_path / "runs" / "figures").iterdir())
    assert "10_attention_head.png" in drawn and len(drawn) == 5, f"the figures go to the scratch folder: {drawn}"
