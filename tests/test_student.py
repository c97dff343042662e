"""Workshop mode (tools/nb.py student | reveal | grade): the student edition leaves every exported body to write,
a stubbed notebook stops at its first check with NotImplementedError, revealing every solution gives back the
course's own code, and the grader runs a chapter's tests against the learner's package."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nb as nbtool  # noqa: E402


@pytest.fixture(scope="module")
def edition(tmp_path_factory):
    out = tmp_path_factory.mktemp("workshop") / "student"
    assert nbtool.main(["student", str(out)]) == 0
    return out


def _code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(c["source"]) for c in cells
            if c["cell_type"] == "code" and nbtool.STUDENT_MARK not in c.get("metadata", {}).get("tags", [])]


def test_stub_keeps_signature_and_docstring_and_replaces_the_body():
    code = 'class A:\n    def f(self, x: int) -> int:\n        """Double."""\n        y = 2 * x\n        return y\n\n' \
           '    def __repr__(self):\n        return "A"\n\n\n@staticmethod\ndef g():\n    @wrap\n    def h():\n        pass\n    return h\n'
    new, names = nbtool.stub_code(code, "04")
    assert names == ["A.f", "g"], names
    assert 'def f(self, x: int) -> int:\n        """Double."""\n        raise NotImplementedError(' in new
    assert "y = 2 * x" not in new and "@wrap" not in new and 'return "A"' in new, new
    compile(new, "stub", "exec")


def test_student_edition_stubs_every_exported_body(edition):
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        student = edition / "notebooks" / path.name
        text = "".join(_code_cells(student))
        assert "NotImplementedError(" in text or "#| export" not in text, f"{path.name}: nothing left to write"
        nb = json.loads(student.read_text())
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), f"{path.name} has outputs"
    stub = (edition / "qwen3_scratch" / "norm.py").read_text()
    assert "raise NotImplementedError('02 · RMSNorm.forward" in stub and "rsqrt" not in stub
    assert "solutions" not in {p.name for p in edition.iterdir()}


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "work.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not empty"):
        nbtool.main(["student", str(tmp_path)])
    assert (tmp_path / "work.txt").read_text() == "mine"


def test_revealing_everything_gives_back_the_course(tmp_path):
    out = tmp_path / "s"
    nbtool.main(["student", str(out)])
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nbtool.reveal(out, path.name[:2], "all")
        assert _code_cells(out / "notebooks" / path.name) == _code_cells(path), f"{path.name}: reveal all differs"
    with pytest.raises(SystemExit, match="exports no function or method 'nope'"):
        nbtool.reveal(out, "02", "nope")


def test_a_student_notebook_stops_at_its_first_check_with_NotImplementedError(edition, tmp_path):
    import shutil
    work = tmp_path / "learner"
    shutil.copytree(edition, work)
    for path in sorted((work / "notebooks").glob("*.ipynb")):  # the learner has done every other chapter
        if not path.name.startswith("02_"):
            nbtool.reveal(work, path.name[:2], "all")
    nb = nbformat.read(work / "notebooks" / "02_rmsnorm.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work / "notebooks")}})
    with pytest.raises(CellExecutionError) as err:
        client.execute()
    assert err.value.ename == "NotImplementedError", f"{err.value.ename}: {err.value.evalue}"
    assert "02 · RMSNorm" in err.value.evalue


def test_grade_runs_the_chapters_tests_against_the_learners_package(edition, tmp_path):
    import shutil
    work = tmp_path / "graded"
    shutil.copytree(edition, work)
    assert [p.name for p in nbtool.chapter_tests("02", work)] == ["test_norm.py"]
    tool = [sys.executable, str(ROOT / "tools" / "nb.py")]
    before = subprocess.run(tool + ["grade", str(work), "02"], capture_output=True, text=True)
    assert before.returncode != 0 and "NotImplementedError" in before.stdout, before.stdout[-2000:]
    for path in sorted((work / "notebooks").glob("*.ipynb")):
        nbtool.reveal(work, path.name[:2], "all")
    after = subprocess.run(tool + ["grade", str(work), "02"], capture_output=True, text=True)
    assert after.returncode == 0, after.stdout[-2000:]
