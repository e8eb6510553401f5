"""The house's rules, read off the source (ast): dependencies point one way, cli -> serve / measure -> formats ->
the shared core, and no module imports itself back through others (lazy imports inside functions and imports for
annotations under TYPE_CHECKING count too); only a format's own package and the formats table name a format."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "edgeqwen"
FACADE = {"edgeqwen", "edgeqwen.__main__"}   # the public API and `python -m edgeqwen`: import anything, lazily
RANK = {"core": 0, "formats": 1, "measure": 2, "serve": 2, "cli": 3}


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the edgeqwen modules it imports (a `from package import name` of a submodule is that submodule)."""
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):   # imports under TYPE_CHECKING count: a circle for annotations is one still
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("edgeqwen"):
                    continue
                names = [a.name for a in node.names if not (target == "edgeqwen" and a.name == "__version__")]
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
                deps.update(subs)
                if len(subs) < len(names):
                    deps.add(target)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("edgeqwen"))
        graph[name] = {d for d in deps if d != name and d in mods}
    return graph


def stage(name: str) -> str:
    parts = name.split(".")
    if name == "edgeqwen.formats":      # the formats table: data every stage may read
        return "core"
    if parts[1:2] == ["formats"]:
        return "formats"
    if parts[1:2] in (["measure"], ["serve"], ["cli"]):
        return parts[1]
    return "core"


def folder(name: str) -> str | None:
    """The format folder a module lives in (gguf, onnx, ...), if any."""
    parts = name.split(".")
    return parts[2] if len(parts) >= 3 and parts[1] == "formats" and (PKG / "formats" / parts[2]).is_dir() else None


def violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for a, deps in graph.items():
        if a in FACADE:
            continue
        for b in deps:
            sa, sb = stage(a), stage(b)
            if b in FACADE:
                out.append(f"{a} imports the package facade {b}")
            elif RANK[sb] > RANK[sa] or {sa, sb} == {"measure", "serve"}:
                out.append(f"{a} ({sa}) imports {b} ({sb})")
            elif None is not folder(a) != folder(b) is not None:
                out.append(f"{a} imports another format's folder: {b}")
    return sorted(out)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), the facade left out."""
    index, low, on, stack, out, n = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w in FACADE:
                continue
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
    for v in graph:
        if v not in index and v not in FACADE:
            visit(v)
    return out


def test_the_checker_finds_what_it_looks_for():
    fake = {"edgeqwen.runner": {"edgeqwen.formats.gguf.rpc"}, "edgeqwen.formats.gguf.rpc": {"edgeqwen.runner"},
            "edgeqwen.measure.plan": {"edgeqwen.serve.queue"}, "edgeqwen.serve.queue": set(),
            "edgeqwen.formats.onnx.runner": {"edgeqwen.formats.gguf.info"}, "edgeqwen.formats.gguf.info": set()}
    assert violations(fake) == [
        "edgeqwen.formats.onnx.runner imports another format's folder: edgeqwen.formats.gguf.info",
        "edgeqwen.measure.plan (measure) imports edgeqwen.serve.queue (serve)",
        "edgeqwen.runner (core) imports edgeqwen.formats.gguf.rpc (formats)"]
    assert cycles(fake) == [["edgeqwen.formats.gguf.rpc", "edgeqwen.runner"]]


def test_imports_point_one_way_and_never_round():
    graph = imports(modules())
    assert len(graph) > 40 and graph["edgeqwen.cli"]   # the walk found the package
    assert violations(graph) == []
    assert cycles(graph) == []


def format_name_uses(source: str, names: set[str]) -> list[str]:
    """Where a source compares with, defaults to, indexes by or enumerates a format's name: what it should ask the
    format's row instead (a pip package or an engine of the same spelling in a plain list is not a format)."""
    tree = ast.parse(source)
    out = []

    def named(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    for n in ast.walk(tree):
        hits = []
        if isinstance(n, ast.Compare):
            hits = [x for x in [n.left, *n.comparators] if named(x)
                    or isinstance(x, (ast.Tuple, ast.List, ast.Set)) and any(named(e) for e in x.elts)]
        elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get":
            hits = [x for x in n.args[1:] if named(x)]
        elif isinstance(n, ast.BoolOp):
            hits = [x for x in n.values if named(x)]
        elif isinstance(n, ast.arguments):
            hits = [x for x in [*n.defaults, *n.kw_defaults] if x is not None and named(x)]
        elif isinstance(n, ast.AnnAssign) and n.value is not None:
            hits = [n.value] if named(n.value) else []
        elif isinstance(n, ast.Subscript):
            s = n.slice
            hits = [x for x in (s.elts if isinstance(s, ast.Tuple) else [s]) if named(x)]
        elif isinstance(n, ast.Call) and getattr(n.func, "attr", getattr(n.func, "id", "")) == "Choice":
            hits = [e for a in n.args if isinstance(a, (ast.List, ast.Tuple)) for e in a.elts if named(e)]
        out += [f"line {x.lineno}: {ast.unparse(n)[:80]}" for x in hits]
    return out


def test_the_format_name_checker_finds_what_it_looks_for():
    src = '''
def f(fmt, m, kind="mlx"):
    if fmt.name != "gguf" or fmt.name in ("onnx", "x"):
        pass
    a = m.get("format", "gguf")
    b = m.get("format") or "gguf"
    c = FORMATS["onnx"].quants
    d: str = "gguf"
    e = click.Choice(["gguf", "onnx"])
    ok = ("gguf", "numpy", "mlx-lm")   # pip packages: not a format
'''
    hits = format_name_uses(src, {"gguf", "onnx", "mlx"})
    # each kind once (the comparisons twice, Choice's list twice); the pip packages' tuple (line 10) not at all
    assert sorted(int(h.split(":")[0].split()[1]) for h in hits) == [2, 3, 3, 5, 6, 7, 8, 9, 9]


def test_no_code_outside_a_formats_own_package_asks_for_it_by_name():
    from edgeqwen.formats import FORMATS
    names = set(FORMATS)
    found = {}
    for name, path in modules().items():
        if name == "edgeqwen.formats" or folder(name) is not None:   # the table, and each format's own package
            continue
        hits = format_name_uses(path.read_text(), names)
        if hits:
            found[name] = hits
    assert found == {}


def test_the_wheel_lists_every_package():
    """setuptools ships the packages pyproject.toml names: a new folder missing there works in a checkout and is
    absent from the wheel (tools/wheel-check.sh would find it much later)."""
    import tomllib
    listed = set(tomllib.loads((PKG.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
    assert folders - listed == set()


BENCH = PKG.parent / "bench"


def test_the_benchmarks_are_one_package_that_shares_its_helpers():
    """`python -m bench.NAME` from the root: no script edits sys.path or reaches into tests/, and every
    measurement imports bench.common (where results live, `edgeqwen` in a child, whole-file writes)."""
    scripts = [p for p in BENCH.glob("*.py") if p.stem not in ("__init__", "common", "harness")]
    assert (BENCH / "__init__.py").exists() and len(scripts) >= 8
    for p in scripts:
        tree = ast.parse(p.read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "bench.common" in names, f"{p.name} does not use bench.common"
        assert not any(m and (m.startswith("test") or m in ("common", "conftest", "helpers")) for m in names), p.name
        calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
        assert not any(c.startswith("sys.path.") for c in calls), f"{p.name} edits sys.path"


def test_every_benchmark_module_imports():
    import importlib
    for p in sorted(BENCH.glob("*.py")):
        importlib.import_module("bench" if p.stem == "__init__" else f"bench.{p.stem}")
