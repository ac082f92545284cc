"""The packages' dependencies run one way, without cycles or private names crossing modules.

Layering (docs: DESIGN.md): `decoding` imports no sibling; `drafting` imports `decoding`;
`distill` imports `decoding` and `drafting`; `alignment` imports `decoding` and `drafting`;
`experiments` may import everything and nothing imports it; `tools/` (not a package) imports
nothing of `experiments`. Every import counts, including those inside functions (a deferred
import is still a dependency), and so does a cycle between two modules of the tree.

The walk is static (`ast`): a relative import is resolved against its module; `from a import b`
depends on the module `a.b` when there is one, else on `a`; `import a.b` on `a.b`.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("decoding", "drafting", "distill", "alignment", "experiments")
ALLOWED = {
    "decoding": {"decoding"},
    "drafting": {"decoding", "drafting"},
    "distill": {"decoding", "drafting", "distill"},
    "alignment": {"decoding", "drafting", "alignment"},
    "experiments": set(PACKAGES),
    "tools": {"decoding", "drafting", "distill", "alignment"},
}

# Known violations, each with the reason it is allowed (none today).
# (importer, imported) pairs against the layering:
KNOWN_UPWARD: set = set()
# modules of a known cycle (each cycle as the set of its modules):
KNOWN_CYCLES: list = []
# (importer, imported module, private name):
KNOWN_PRIVATE: set = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module of the five packages and of tools/: dotted name -> file."""
    out = {}
    for top in PACKAGES + ("tools",):
        for path in sorted((ROOT / top).rglob("*.py")):
            if "results" in path.relative_to(ROOT).parts or "__pycache__" in path.parts:
                continue
            out[_module_name(path)] = path
    return out


def _is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def _first_party(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _target(name: str) -> str:
    """The longest known module that `name` names or lies in (a name may be an attribute)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules():
            return candidate
    return name


@functools.lru_cache(maxsize=None)
def imports(module: str) -> tuple[tuple[str, str | None, int], ...]:
    """(imported module, imported name or None, line) for every import of `module`, at any depth."""
    path = modules()[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if _is_package(module) else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((_target(alias.name), None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in modules():  # `from pkg import submodule`
                    out.append((full, None, node.lineno))
                else:
                    out.append((_target(source), alias.name, node.lineno))
    return tuple(out)


def _top(name: str) -> str:
    return name.split(".")[0]


def upward_imports() -> list[tuple[str, str, int]]:
    bad = []
    for module in modules():
        allowed = ALLOWED[_top(module)]
        for target, _, line in imports(module):
            if _first_party(target) and _top(target) not in allowed:
                bad.append((module, target, line))
    return bad


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(m) if t in modules() and t != m} for m in modules()}


def cycles() -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    g, index, low, stack, on, out = graph(), {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def private_imports() -> list[tuple[str, str, str, int]]:
    """`from a import _x` (or `a._x` through an imported module) where `a` is another module
    of the tree and `_x` is not a module: a private name used across modules."""
    bad = []
    for module, path in modules().items():
        for target, name, line in imports(module):
            if name and name.startswith("_") and not name.startswith("__") and _first_party(target) \
                    and target != module:
                bad.append((module, target, name, line))
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}  # local name -> first-party module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _first_party(a.name) and a.name in modules():
                        aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    for target, name, line in imports(module):
                        if line == node.lineno and name is None and target.rpartition(".")[2] == a.name \
                                and _first_party(target):
                            aliases[a.asname or a.name] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__"):
                target = aliases[node.value.id]
                if target != module and f"{target}.{node.attr}" not in modules():
                    bad.append((module, target, node.attr, node.lineno))
    return bad


# --------------------------------------------------------------------------------------------


def test_the_walk_sees_the_tree():
    mods = modules()
    assert {"decoding.generation", "decoding.autotune", "experiments.specbench.cli", "tools.gpu_chunks"} <= set(mods)
    # deferred imports are found: experiments.methods imports hf_peers inside a function
    assert "experiments.hf_peers" in {t for t, _, _ in imports("experiments.methods")}
    # relative imports resolve against the package
    assert "experiments.methods" in {t for t, _, _ in imports("experiments.specbench.runner")}


def test_no_import_against_the_layering():
    bad = [(m, t, line) for m, t, line in upward_imports() if (m, _top(t)) not in KNOWN_UPWARD]
    assert not bad, "imports against the layering (importer, imported, line): " + repr(bad)


def test_nothing_imports_experiments():
    bad = [(m, t, line) for m, t, line in upward_imports() if _top(t) == "experiments"]
    bad += [(m, t, line) for m in modules() if _top(m) in ("tools",) for t, _, line in imports(m)
            if _top(t) == "experiments"]
    assert not bad, bad


def test_no_import_cycle():
    found = cycles()
    unknown = [c for c in found if not any(c <= known for known in KNOWN_CYCLES)]
    assert not unknown, "import cycles (deferred imports count): " + repr([sorted(c) for c in unknown])


def test_no_private_name_crosses_modules():
    bad = [b for b in private_imports() if b[:3] not in KNOWN_PRIVATE]
    assert not bad, "private names used from another module (importer, module, name, line): " + repr(bad)


def test_known_exceptions_are_outside_experiments_and_tools():
    """Every module of experiments/ and tools/ passes without an exception."""
    assert not any(_top(m) in ("experiments", "tools") for m, _ in KNOWN_UPWARD)
    assert not any(_top(m) in ("experiments", "tools") for c in KNOWN_CYCLES for m in c)
    assert not any(_top(m) in ("experiments", "tools") for m, _, _ in KNOWN_PRIVATE)


def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch):
    """A tree with an upward import, a deferred cycle and a private name fails each check."""
    for pkg in ("decoding", "drafting", "distill", "alignment", "experiments", "tools"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "decoding" / "a.py").write_text("def f():\n    from drafting import b\n")
    (tmp_path / "drafting" / "b.py").write_text("from decoding.c import _secret\n")
    (tmp_path / "decoding" / "c.py").write_text("_secret = 1\ndef g():\n    from . import d\n")
    (tmp_path / "decoding" / "d.py").write_text("from .c import g\nimport decoding.c as c\nx = c._secret\n")
    (tmp_path / "alignment" / "e.py").write_text("import experiments\n")
    (tmp_path / "experiments" / "f.py").write_text("from . import g\n")
    (tmp_path / "experiments" / "g.py").write_text("def h():\n    from .f import x\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    modules.cache_clear()
    imports.cache_clear()
    try:
        up = {(m, _top(t)) for m, t, _ in upward_imports()}
        assert ("decoding.a", "drafting") in up and ("alignment.e", "experiments") in up
        assert {"decoding.c", "decoding.d"} in cycles() and {"experiments.f", "experiments.g"} in cycles()
        priv = {(m, t, n) for m, t, n, _ in private_imports()}
        assert ("drafting.b", "decoding.c", "_secret") in priv and ("decoding.d", "decoding.c", "_secret") in priv
    finally:
        modules.cache_clear()
        imports.cache_clear()
