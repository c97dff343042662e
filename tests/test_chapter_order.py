"""Chapters build in order: a notebook imports only from modules exported by earlier chapters or by itself, so
a learner can do them one after another (and the student edition's package fills up in that order)."""
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPORT = re.compile(r"^#\|\s*(default_exp|export|exporti)\s*([\w.]*)", re.M)


def _code(path):
    return [("".join(c["source"])) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def owners() -> dict[str, int]:
    """{module: the chapter that exports it}."""
    found = {}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        default = None
        for src in _code(path):
            for kind, mod in EXPORT.findall(src):
                if kind == "default_exp":
                    default = mod
                found.setdefault(mod or default, int(path.name[:2]))
    found.pop(None, None)
    return found


def _outside_functions(tree):
    """Every node that runs when the cell runs: a function's body is skipped, because an import there runs only
    when that function is called (chapter 9's CLI reaches chapter 16's tensor parallelism only for --tp)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [child for child in ast.iter_child_nodes(node)
                 if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]


def imported_modules(src: str) -> set[str]:
    """qwen3_scratch modules a cell imports when it runs (IPython magics and shell lines are skipped; imports inside
    a function body run only when it is called, so they are not counted)."""
    code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("!", "%")))
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    mods = set()
    for node in _outside_functions(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qwen3_scratch"):
            inner = node.module.partition(".")[2]  # "config", "lab.bench", or "" for the package itself
            if inner and inner != "lab":
                mods.add(inner)
            else:  # from qwen3_scratch import X / from qwen3_scratch.lab import X: X is a module or a public name
                mods.update(f"{inner}.{a.name}" if inner else a.name for a in node.names)
        elif isinstance(node, ast.Import):
            mods.update(a.name.partition(".")[2] for a in node.names if a.name.startswith("qwen3_scratch."))
    return mods


def test_every_chapter_imports_only_earlier_chapters():
    own = owners()
    public = {}  # names re-exported by __init__ -> their module
    init = (ROOT / "qwen3_scratch" / "__init__.py").read_text()
    for mod, names in re.findall(r"^from \.(\w+) import (.+)$", init, re.M):
        for name in names.split(","):
            public[name.strip()] = mod
    problems = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        chapter = int(path.name[:2])
        for src in _code(path):
            for mod in imported_modules(src):
                mod = public.get(mod, mod)
                if mod in own and own[mod] > chapter:
                    problems.append(f"{path.name} imports qwen3_scratch.{mod}, which chapter {own[mod]:02d} builds")
    assert not problems, "\n".join(problems)


def test_the_import_reader_sees_every_form():
    src = ("from qwen3_scratch.config import Qwen3Config\nimport qwen3_scratch.model as m\nfrom qwen3_scratch import generate\n"
           "!ls\nif True:\n    from qwen3_scratch.rope import apply_rope\ndef f():\n    from qwen3_scratch.quant import x\n"
           "from qwen3_scratch.lab.bench import spread\nfrom qwen3_scratch.lab import quant_bench\n")
    assert imported_modules(src) == {"config", "model", "generate", "rope", "lab.bench", "lab.quant_bench"}
