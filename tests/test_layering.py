"""Every import inside `llava_moslora` points down the layer order and no two modules import each
other, directly or through others.

The order is the one line of docs/development.md's layout section that starts with
`Layers, lowest first:`; this test reads it from there, so the document and the check cannot drift.
Imports are read statically (ast), those inside functions included: a function-level import of a
higher layer is the same tangle, only deferred.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llava_moslora"
LAYERS_LINE = re.compile(r"^Layers, lowest first: (?P<order>.+)$", re.MULTILINE)


def declared_layers() -> list[tuple[str, ...]]:
    """The layers of docs/development.md, lowest first; each a tuple of sub-package/module names."""
    text = (REPO / "docs" / "development.md").read_text()
    match = LAYERS_LINE.search(text)
    assert match, "docs/development.md lost its `Layers, lowest first: a < b c < ...` line"
    return [tuple(layer.strip("` ").split()) for layer in match["order"].split("<")]


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__.py)."""
    found = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _target(name: str, known: dict[str, Path]) -> str:
    """The module of the package that importing `name` (a module or a name in one) runs."""
    while name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules `module` imports anywhere in its file (relative imports resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod.
            names = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                for alias in node.names
            ]
        else:
            continue
        found |= {_target(name, known) for name in names if name.split(".")[0] == PACKAGE}
    found.discard(module)
    found.discard(PACKAGE)  # the empty top-level __init__: importing any module runs it anyway
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {module: imports_of(module, path, known) for module, path in known.items()}


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int | None:
    first = module.split(".")[1] if "." in module else None
    for index, names in enumerate(layers):
        if first in names:
            return index
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]]) -> set[str]:
    """'importer -> imported' for every import from a lower layer into a higher one."""
    return {
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target, layers) > layer_of(module, layers)
    }


# --- the checks on the package ------------------------------------------------------------------


def test_every_module_is_in_a_declared_layer():
    layers = declared_layers()
    names = [name for layer in layers for name in layer]
    assert len(names) == len(set(names)), f"a name is in two layers: {layers}"
    unplaced = sorted(m for m in modules() if m != PACKAGE and layer_of(m, layers) is None)
    assert not unplaced, (
        f"{unplaced} belong to no layer: add their sub-package or module to the "
        "`Layers, lowest first:` line of docs/development.md"
    )


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_import_points_down_the_layers():
    assert sorted(upward_imports(import_graph(), declared_layers())) == []


# --- the checker itself: it must see what it is meant to catch ---------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    known = {}
    for path in sorted(tmp_path.rglob("*.py")):
        parts = list(path.relative_to(tmp_path).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        known[".".join(parts)] = path
    return {m: imports_of(m, p, known) for m, p in known.items()}


@pytest.fixture
def toy(tmp_path):
    return lambda files: _package(tmp_path, {f"{PACKAGE}/__init__.py": "", **files})


def test_checker_sees_function_level_relative_and_absolute_imports(toy):
    graph = toy(
        {
            "llava_moslora/low/__init__.py": "from .a import x\n",
            "llava_moslora/low/a.py": "def f():\n    from ..high import b\n",
            "llava_moslora/low/c.py": "import llava_moslora.high.b\n",
            "llava_moslora/high/__init__.py": "",
            "llava_moslora/high/b.py": "from llava_moslora.low.a import f\n",
        }
    )
    assert graph["llava_moslora.low"] == {"llava_moslora.low.a"}
    assert graph["llava_moslora.low.a"] == {"llava_moslora.high.b"}
    assert graph["llava_moslora.low.c"] == {"llava_moslora.high.b"}
    layers = [("low",), ("high",)]
    assert upward_imports(graph, layers) == {
        "llava_moslora.low.a -> llava_moslora.high.b",
        "llava_moslora.low.c -> llava_moslora.high.b",
    }
    assert cycles(graph) == [["llava_moslora.high.b", "llava_moslora.low.a"]]


def test_checker_sees_a_cycle_through_three_modules_of_one_package(toy):
    graph = toy(
        {
            "llava_moslora/p/__init__.py": "",
            "llava_moslora/p/a.py": "from . import b\n",
            "llava_moslora/p/b.py": "from .c import name\n",
            "llava_moslora/p/c.py": "def f():\n    from llava_moslora.p import a\n",
        }
    )
    assert cycles(graph) == [["llava_moslora.p.a", "llava_moslora.p.b", "llava_moslora.p.c"]]
    assert upward_imports(graph, [("p",)]) == set()


def test_checker_places_a_top_level_module_as_a_layer_of_its_own(toy):
    """`runs` is a module, not a sub-package, between `train` and `export`: placed like them."""
    graph = toy(
        {
            "llava_moslora/low/__init__.py": "",
            "llava_moslora/low/a.py": "x = 1\n",
            "llava_moslora/low/c.py": "from llava_moslora.mid import f\n",
            "llava_moslora/mid.py": "from .low.a import x\n\ndef f():\n    from .high import b\n",
            "llava_moslora/high/__init__.py": "",
            "llava_moslora/high/b.py": "from llava_moslora.low import a\n",
            "llava_moslora/high/d.py": "from llava_moslora import mid\n",
        }
    )
    layers = [("low",), ("mid",), ("high",)]
    assert layer_of("llava_moslora.mid", layers) == 1
    assert graph["llava_moslora.mid"] == {"llava_moslora.low.a", "llava_moslora.high.b"}
    assert graph["llava_moslora.high.d"] == {"llava_moslora.mid"}
    assert upward_imports(graph, layers) == {
        "llava_moslora.low.c -> llava_moslora.mid",
        "llava_moslora.mid -> llava_moslora.high.b",
    }
    assert cycles(graph) == []


# --- the top-level eval/ folder (the user's entry points) ---------------------------------------

EVAL_DIR = REPO / "eval"


def test_the_top_level_eval_folder_shadows_nothing():
    """eval/ holds data and scripts, never a Python package or module: with the repository root
    on sys.path (pytest, `python -m` from the root) `import eval...` must not exist, and
    `llava_moslora.eval` must still be the package's."""
    import importlib.util
    import subprocess
    import sys

    python_files = sorted(str(p.relative_to(REPO)) for p in EVAL_DIR.rglob("*.py"))
    assert python_files == [], (
        f"{python_files}: eval/ is not a package; code goes in {PACKAGE}/eval/"
    )
    assert not (REPO / PACKAGE / "eval" / "suites").exists()  # one home for the suites
    code = "import llava_moslora.eval as e; print(e.__file__)"
    for cwd in (REPO, EVAL_DIR):  # the current folder comes first on sys.path with -c
        run = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
        assert run.stdout.strip() == str(REPO / PACKAGE / "eval" / "__init__.py"), run.stderr
    assert importlib.util.find_spec("llava_moslora.eval").origin == str(
        REPO / PACKAGE / "eval" / "__init__.py"
    )


def test_the_eval_folder_names_only_what_exists():
    """Every suite file lists known benchmarks (read through the package's reader), every
    `llava-moslora` subcommand and script path its shell scripts and README name exists."""
    from llava_moslora.eval.benchmarks import SUITES_DIR, read_suite, suite_names

    assert SUITES_DIR == EVAL_DIR / "suites"
    assert suite_names() == ["paper9", "tiny"]
    for name in suite_names():
        assert read_suite(name)  # raises on an unknown name, naming the file and line
    texts = {p: p.read_text() for p in EVAL_DIR.rglob("*") if p.suffix in (".sh", ".md")}
    assert EVAL_DIR / "run_paper9.sh" in texts and EVAL_DIR / "README.md" in texts
    for path, text in texts.items():
        for ref in re.findall(
            r"\b((?:eval|scripts|docs|configs|llava_moslora)/[\w./-]+\.\w+)", text
        ):
            assert (REPO / ref).exists(), (
                f"{path.relative_to(REPO)} names {ref}, which does not exist"
            )
    mentions = [
        p
        for p in REPO.rglob("*.md")
        if ".venv" not in p.parts and "scripts/run_paper9.sh" in p.read_text()
    ]
    assert mentions == [], f"{mentions} still name scripts/run_paper9.sh (now eval/run_paper9.sh)"
