"""Any cell can be re-run after the whole notebook ran: a name that one cell reads from another cell is bound
by exactly one cell, so a later section cannot leave a different `Dh` or `q` behind for an earlier one.
A static check over each code cell's names (scopes of functions, lambdas and comprehensions respected)."""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["04_attention.ipynb"]  # notebooks held to the rule
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
           ast.GeneratorExp)


def _own_nodes(node):
    """The nodes of node's own scope: nested scopes are yielded, not entered."""
    for child in ast.iter_child_nodes(node):
        yield child
        if not isinstance(child, _SCOPES):
            yield from _own_nodes(child)


def _bound(node) -> dict[str, str | None]:
    """Names a scope binds: assignment and loop targets, defs, classes, imports, `except ... as`, parameters.
    The value says what an import binds ('torch.nn.functional'), None for everything else."""
    names = {}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        names |= {x.arg: None for x in a.posonlyargs + a.args + a.kwonlyargs + [a.vararg, a.kwarg] if x is not None}
    for n in _own_nodes(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            names[n.id] = None
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[n.name] = None
        elif isinstance(n, ast.Import):
            names |= {a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            names |= {a.asname or a.name: f"{'.' * n.level}{n.module}.{a.name}" for a in n.names}
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names[n.name] = None
    return names


def _free(node) -> set[str]:
    """Names read in node's scope (and nested ones) that the scope does not bind itself."""
    loads = set()
    for n in _own_nodes(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load):
            loads.add(n.id)
        elif isinstance(n, _SCOPES):
            loads |= _free(n)
    return loads - set(_bound(node))


def rerun_problems(cells: list[str]) -> list[str]:
    """One line per name that a cell reads from other cells while more than one cell binds it."""
    trees = []
    for src in cells:
        code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        trees.append(ast.parse(code))
    binders: dict[str, list[int]] = {}
    what: dict[str, set] = {}  # name -> what its bindings bind (an import's source, or a cell's own value)
    for i, tree in enumerate(trees):
        for name, source in _bound(tree).items():
            binders.setdefault(name, []).append(i)
            what.setdefault(name, set()).add(source if source is not None else i)
    problems = []
    for i, tree in enumerate(trees):
        for name in sorted(_free(tree)):
            if len(what.get(name, ())) > 1:  # importing the same module again in another cell is harmless
                problems.append(f"code cell {i} reads `{name}`, which code cells {binders[name]} all bind")
    return problems


def code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("name", CHECKED)
def test_every_cell_can_be_rerun_after_the_whole_notebook(name):
    problems = rerun_problems(code_cells(ROOT / "notebooks" / name))
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_the_checker_sees_a_name_rebound_by_a_later_section():
    cells = ["B, Dh = 2, 8\nq = torch.randn(B, Dh)", "print(q.shape, Dh)", "Dh = 128  # a later section"]
    assert rerun_problems(cells) == ["code cell 1 reads `Dh`, which code cells [0, 2] all bind"]


def test_the_checker_respects_scopes():
    cells = ["def f(q, *rest):\n    k = q + 1\n    return [k for k in rest], (lambda v: v)(k)",
             "q = 1\nfor k in range(3):\n    pass", "q, k = 2, 3\nprint(f(q), k)", "import math\ntry:\n    pass\nexcept ValueError as err:\n    print(err)",
             "err = None\nimport math\nprint(err, math.pi)"]
    assert rerun_problems(cells) == []  # f's parameters and locals are its own; each cell reads what it binds
    assert rerun_problems(cells + ["print(k)"]) == ["code cell 5 reads `k`, which code cells [1, 2] all bind"]
    assert rerun_problems(cells + ["import cmath as math", "print(math.pi)"]) == [
        "code cell 6 reads `math`, which code cells [3, 4, 5] all bind"]
