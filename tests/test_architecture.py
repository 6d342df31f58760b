"""The house plan, checked on the source: no import cycles in dmc_jax/ or pallas_kernels/ (imports inside functions
count too: a cycle deferred to call time is still a cycle), pallas_kernels imports no dmc_jax, nothing below a
task imports a task or the entry point, and library code never imports configs/ or tests/."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dmc_jax", "pallas_kernels")


def _modules() -> dict:
    """{module name: path} of every .py file in the packages."""
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(module: str, path: str, known: set) -> set:
    """The project modules `module` imports anywhere in its file (the named module, or the module an imported
    name lives in)."""
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parts = parts if is_package else parts[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # 'pkg.mod.attr' -> 'pkg.mod'
                t = t.rpartition(".")[0]
            if t and t != module:
                found.add(t)
    return found


def _graph() -> dict:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_cycle_when_there_is_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    graph = _graph()
    assert "dmc_jax.cache.protocol" in graph["dmc_jax.cache.registry"]
    assert "dmc_jax.cache.registry" in graph["dmc_jax.cache.h2o"]
    assert "dmc_jax.cache.model_method" in graph["dmc_jax.config_schema"]  # imported inside validate()


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_pallas_kernels_import_jax_only():
    bad = {m: sorted(d for d in deps if d.startswith("dmc_jax")) for m, deps in _graph().items()
           if m.startswith("pallas_kernels")}
    assert not any(bad.values()), bad


@pytest.mark.parametrize("forbidden", ["dmc_jax.tasks", "dmc_jax.main"])
def test_nothing_below_a_task_imports_a_task_or_the_entry_point(forbidden):
    # The entry points: main and its tasks (the schema validates each task's section) and lm-eval's backend, which
    # lm-eval loads as a plug-in and which loads models as the tasks do.
    above = ("dmc_jax.tasks", "dmc_jax.main", "dmc_jax.config_schema", "dmc_jax.evaluation.lm_eval_")
    bad = {m: sorted(d for d in deps if d == forbidden or d.startswith(forbidden + "."))
           for m, deps in _graph().items() if not m.startswith(above)}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_library_code_never_imports_configs_or_tests():
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("configs", "tests") for n in names), module
