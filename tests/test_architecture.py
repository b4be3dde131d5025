"""Layering of the code base, read from the source with ``ast`` (nothing is imported).

* ``robustmedseg/`` (phase 1, data, federation, shared helpers) is the lower layer: it never
  imports ``MultiMedSeg`` (phase 2), the root ``training_plan`` or a root script;
* no import cycle between the project's modules (lazy imports inside functions count too);
* the small shared helpers have one definition each;
* the README's layout table names the tree as it is.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("robustmedseg", "MultiMedSeg", "op", "demo", "bench")
ROOT_MODULES = ("model", "training_plan", "prepare_data", "train", "save_global_model", "generate_volumes")
ROOT_SCRIPTS = ("prepare_data", "train", "save_global_model", "generate_volumes")


def _module_files() -> Dict[str, Path]:
    """Dotted module name -> file, for the packages and the top-level modules."""
    files = {name: REPO / f"{name}.py" for name in ROOT_MODULES}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _imports(name: str, path: Path) -> Iterator[Tuple[str, int]]:
    """(imported module, line) of every import statement of a module, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno
            for alias in node.names:  # ``from pkg import submodule``
                yield f"{base}.{alias.name}", node.lineno


def _graph() -> Dict[str, Set[str]]:
    files = _module_files()
    graph: Dict[str, Set[str]] = {}
    for name, path in files.items():
        graph[name] = {target for target, _ in _imports(name, path) if target in files and target != name}
    return graph


def test_robustmedseg_imports_no_higher_layer():
    bad: List[str] = []
    for name, path in _module_files().items():
        if name != "robustmedseg" and not name.startswith("robustmedseg."):
            continue
        for target, line in _imports(name, path):
            top = target.split(".")[0]
            if top in ("MultiMedSeg", "training_plan", "demo", "bench") or top in ROOT_SCRIPTS:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_shared_modules_import_no_project_layer():
    """``model.py`` (the one generator/discriminator module of both phases) and ``op/`` import nothing
    from the project's packages; the factory file's module needs no federation, no training code."""
    bad: List[str] = []
    for name, path in _module_files().items():
        if name == "model" or name == "op" or name.startswith("op."):
            allowed: Tuple[str, ...] = ("op",)
        elif name == "robustmedseg.factory_file":
            allowed = ("model", "robustmedseg.errors", "robustmedseg.io")
        else:
            continue
        for target, line in _imports(name, path):
            top = target.split(".")[0]
            if top in PACKAGES + ROOT_MODULES and not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_phase2_reads_the_factory_file_without_the_federation():
    bad = [f"{path.relative_to(REPO)}:{line} imports {target}"
           for name, path in _module_files().items() if name.startswith(("MultiMedSeg", "robustmedseg.factory."))
           for target, line in _imports(name, path) if target.startswith("robustmedseg.federation")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # a package __init__ that re-exports its own submodules is not a cycle between modules
    real = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert not real, f"import cycles: {real}"


def test_the_detector_sees_a_cycle(tmp_path):
    """The cycle check is not vacuous: the old coach <-> inference lazy import would be caught."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import b\n")
    b.write_text("def f():\n    from a import x\n")
    assert ("b", 1) in list(_imports("a", a)) and ("a", 2) in list(_imports("b", b))


def _definitions(name: str) -> List[str]:
    found = []
    for module, path in _module_files().items():
        if module.startswith("bench"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                found.append(module)
    return found


def test_shared_helpers_have_one_home():
    assert _definitions("load_torch_file") == ["robustmedseg.io"]
    assert _definitions("strip_module_prefix") == ["robustmedseg.io"]
    assert _definitions("seed_everything") == ["robustmedseg.device"]
    assert _definitions("one_hot") == ["robustmedseg.data.slices"]
    assert _definitions("list_slices") == ["robustmedseg.data.slices"]
    assert _definitions("load_factory_file") == ["robustmedseg.factory_file"]
    assert _definitions("read_factory_file") == ["robustmedseg.factory_file"]
    assert _definitions("write_factory_file") == ["robustmedseg.factory_file"]
    assert _definitions("check_image_size") == ["model"]
    assert _definitions("GeneratorArgs") == ["model"]
    assert _definitions("load_ensemble") == ["MultiMedSeg.ensemble"]
    readers = []
    for module, path in _module_files().items():
        if module.startswith("bench"):
            continue
        text = path.read_text()
        if "torch.load(" in text.replace("``torch.load(", "").replace("`torch.load(", ""):
            readers.append(module)
    assert readers == ["robustmedseg.io"], f"torch.load outside robustmedseg.io: {readers}"


def test_readme_layout_table_matches_the_tree():
    """Every path the README's layout table names exists, and every top-level module/folder (and every
    entry of robustmedseg/ and MultiMedSeg/) is in the table."""
    import re
    import subprocess

    text = (REPO / "README.md").read_text()
    table = text[text.index("## Repository layout"):].split("\n## ")[0]
    named = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            named |= {t.rstrip("/") for t in re.findall(r"`([^`]+)`", row.split("|")[1])}
    assert named and all((REPO / p).exists() for p in named), sorted(p for p in named if not (REPO / p).exists())
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout
        tracked = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    required = set()
    for path in tracked:
        parts = path.split("/")
        if parts[0].startswith(".") or (len(parts) == 1 and not path.endswith(".py")):
            continue  # hidden entries, README/Makefile/...
        if parts[0] in ("robustmedseg", "MultiMedSeg") and len(parts) > 1:
            if parts[1] != "__init__.py":
                required.add("/".join(parts[:2]))
        else:
            required.add(parts[0])
    missing = sorted(p for p in required if not any(p == n or p.startswith(n + "/") for n in named))
    assert not missing, f"not in the README layout table: {missing}"
