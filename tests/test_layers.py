"""The package's floors: the library (qwen3_scratch/*.py) below, the lab (qwen3_scratch/lab/: each chapter's
experiments) above it, the command table (__main__.py) on top. Every import is followed, at module level and inside
functions alike: no import circles anywhere, the library never imports the lab, and no module grows past the size
a reader can hold in mind."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qwen3_scratch"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """{dotted name: path} of every module of the package, subpackages included ('lab' is lab/__init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .config import X / from . import lab
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(["qwen3_scratch", *base] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" for a in node.names] + [module]
        for target in targets:
            if not target.startswith("qwen3_scratch"):
                continue
            inner = target.partition(".")[2]
            while inner and inner not in known:  # from qwen3_scratch.quant import X -> quant
                inner = inner.rpartition(".")[0]
            if inner and inner != name:
                found.add(inner)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items() if name}


def is_lab(name: str) -> bool:
    return name == "lab" or name.startswith("lab.")


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_circles_at_any_depth():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_library_never_imports_the_lab():
    upward = sorted(f"{a} -> {b}" for a, deps in graph().items() if not is_lab(a) and a != "__main__"
                    for b in deps if is_lab(b))
    assert not upward, "library modules import the lab (move the shared piece down into the library): " + \
        ", ".join(upward)


def test_no_module_is_too_long_and_each_says_what_it_is():
    long = [f"{p.relative_to(PACKAGE)} ({n} lines)" for p in modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines (split library from lab, or by concern): {', '.join(long)}"
    silent = [str(p.relative_to(PACKAGE)) for p in modules().values() if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not silent, f"modules without an opening docstring: {', '.join(silent)}"


@pytest.mark.parametrize("g, cycle", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
                                      ({"a": {"b"}, "b": set()}, None)])
def test_the_cycle_finder_finds_cycles(g, cycle):
    assert find_cycle(g) == cycle


def test_the_walker_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from qwen3_scratch.lab.bench import spread\n    import qwen3_scratch.quant\n"
                   "from . import config\n")
    assert imports_of("weights", src, {"lab.bench", "quant", "config", "weights"}) == {"lab.bench", "quant", "config"}
