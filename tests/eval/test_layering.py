"""The package layering, read from every module's imports (ast, no import executed).

    common                          imports no other package of ours
    tableak / textleak / speechleak import only common (and themselves)
    eval                            may import all of them
and no import cycle among our modules (module-level imports; imports inside functions are
deliberately lazy and do not count).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "tableak", "textleak", "speechleak", "eval")
ALLOWED = {
    "common": {"common"},
    "tableak": {"common", "tableak"},
    "textleak": {"common", "textleak"},
    "speechleak": {"common", "speechleak"},
    "eval": set(PACKAGES),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = f
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str) -> str | None:
    """The longest of our modules that ``name`` names or lies in (None: not ours)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in MODULES:
            return cand
    return None


def imports(module: str, *, module_level_only: bool) -> set[str]:
    """Our modules imported by ``module`` (``from pkg import sub`` counts ``pkg.sub`` when it is a module)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # include imports under module-level if/try blocks, not in functions
        stack, nodes = list(tree.body), []
        while stack:
            n = stack.pop()
            nodes.append(n)
            if isinstance(n, (ast.If, ast.Try)):
                stack.extend(ast.iter_child_nodes(n))
    found: set[str] = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            names = [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            base = _resolve(module, n, path.name == "__init__.py")
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in n.names]
        else:
            continue
        for name in names:
            target = _ours(name)
            if target is not None and target != module:
                found.add(target)
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_package_imports_respect_the_layers(module):
    pkg = module.split(".")[0]
    bad = sorted(m for m in imports(module, module_level_only=False) if m.split(".")[0] not in ALLOWED[pkg])
    assert not bad, f"{module} ({pkg}) may import only {sorted(ALLOWED[pkg])}, but imports {bad}"


def _cycles() -> list[list[str]]:
    graph = {m: imports(m, module_level_only=True) for m in MODULES}
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            strong(m)
    return out


def test_no_import_cycles_among_our_modules():
    cycles = _cycles()
    assert not cycles, f"module-level import cycles: {cycles}"


def test_the_layering_check_sees_a_violation_and_a_cycle(tmp_path, monkeypatch):
    """The checks above must be able to fail: a modality module importing eval, and a cycle."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from eval import records\nimport textleak.b\n")
    b.write_text("from . import a\n")
    monkeypatch.setitem(MODULES, "textleak.a", a)
    monkeypatch.setitem(MODULES, "textleak.b", b)
    assert "eval" in {m.split(".")[0] for m in imports("textleak.a", module_level_only=False)}
    assert ["textleak.a", "textleak.b"] in _cycles()
