"""pytest's settings for every run, tests and notebooks alike (`pytest notebooks/12_pretraining.ipynb` too):
no network, no windows, and the short, checked version of chapters that train or time things. And a guard: a
test session must not write any file that git tracks (figures, results, the package's data; see
`qwen3_scratch.utils.publishing`), so the session fails, naming the files, when one was written."""
import os
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("QWEN3_SCRATCH_QUICK", "1")  # see qwen3_scratch.utils.quick_run

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: two workers share the cores, one torch thread each
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent


def tracked_files_state(root: Path = ROOT) -> dict | None:
    """{path: (mtime_ns, size) or None if missing} for every file git tracks under root; None outside a checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    state = {}
    for name in filter(None, out.decode("utf-8", "replace").split("\0")):
        try:
            st = (root / name).stat()
            state[name] = (st.st_mtime_ns, st.st_size)
        except OSError:
            state[name] = None
    return state


def pytest_sessionstart(session):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # under xdist the controller checks the whole session
        return
    session.config._tracked_before = tracked_files_state()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_tracked_before", None)
    after = tracked_files_state() if before is not None else None
    if not before or not after:
        return
    written = sorted(name for name, state in before.items() if after.get(name) != state)
    if written:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"this test session wrote {len(written)} file(s) that git tracks (running a chapter must never "
                   f"change what the course ships; publish with QWEN3_SCRATCH_PUBLISH=1): {', '.join(written[:20])}")
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True, bold=True)
        session.exitstatus = 1


# Chapter 20 drafts for chapter 19's teacher (shipped). Its students are made by chapter 19's full run
# (`python -m qwen3_scratch distill-lab --ship`); until they ship, the quick run lets chapter 12's model stand in for
# them, and the full run cannot run. Without the teacher the chapter cannot run at all, and says so.
def _chapter_20_missing() -> list:
    data = ROOT / "qwen3_scratch" / "data"
    need = [data / "shakespeare" / "teacher"]
    if os.environ.get("QWEN3_SCRATCH_QUICK") != "1":
        need += [data / "students" / name for name in ("distilled", "pruned", "scratch")]
    return [p for p in need if not (p / "config.json").is_file()]


def pytest_collection_modifyitems(config, items):
    chapter_20 = [item for item in items if "20_speculative_decoding.ipynb" in str(item.fspath)]
    missing = _chapter_20_missing() if chapter_20 else []
    if not missing:
        return
    import pytest

    reason = (f"chapter 20 needs chapter 19's checkpoints, missing: "
              f"{', '.join(str(p.relative_to(ROOT)) for p in missing)} (python -m qwen3_scratch distill-lab --ship)")
    for item in chapter_20:
        item.add_marker(pytest.mark.skip(reason=reason))
