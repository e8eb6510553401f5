"""The suite's own rule, read off its sources (ast): a test that compares generated text between two paths uses
the margin model (tests/margin.py), never a random one, whose greedy text depends on the CPU's kernels.

"Generated" here is concrete: a value that comes from a call of `stream`, `generate_text`, `respond`, `generate`
(Hugging Face's), `run_cli("run" | "chat", ...)` or `invoke` likewise (or `run_cli(*args)` with such args), an
HTTP POST, the openai client (`.create`), helpers' `two_chat_turns`, or a helper of the test module that makes such
a call (or runs a module-level script that does), or from a name or expression built from one. A comparison (`==`,
`!=`, `in`) of two generated values is a text comparison, unless both come from the very same call written the
same way (one path twice: the seeded-sampling reproducibility checks). A test (its parameters, or any fixture it
requests) must then name a margin fixture (`margin_*`).
"""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GENERATORS = {"stream", "generate_text", "respond", "generate", "create", "post", "_cli_bytes", "two_chat_turns"}
CLI_GENERATORS = {"run", "chat"}
CLI_RUNNERS = {"run_cli", "invoke"}   # tests/helpers.py: in a child process, in this one


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _is_generator(call: ast.Call, generators=GENERATORS, cli_args: frozenset = frozenset()) -> bool:
    name = _call_name(call)
    if name in generators:
        return True
    if name in CLI_RUNNERS and call.args:
        first = call.args[0]
        if isinstance(first, ast.Constant):
            return first.value in CLI_GENERATORS
        # run_cli(*args) with args = ("run", ...) bound in the same function
        return isinstance(first, ast.Starred) and isinstance(first.value, ast.Name) and first.value.id in cli_args
    return False


def _cli_tuples(func: ast.AST) -> frozenset:
    """Names bound to a tuple whose first item is "run" or "chat" (the arguments of run_cli(*args))."""
    return frozenset(t.id for n in ast.walk(func) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple)
                     and n.value.elts and isinstance(n.value.elts[0], ast.Constant)
                     and n.value.elts[0].value in CLI_GENERATORS for t in n.targets if isinstance(t, ast.Name))


def module_generators(tree: ast.Module) -> set[str]:
    """GENERATORS plus the module's own helpers that call one (to a fixed point): `_greedy(...)` counts too."""
    gens = set(GENERATORS)
    helpers = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and not n.name.startswith("test_")]
    # a script the helper runs in a child process (a module-level string) that streams a model's tokens
    scripts = {t.id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
               and isinstance(n.value.value, str) and any(f"{g}(" in n.value.value for g in GENERATORS)
               for t in n.targets if isinstance(t, ast.Name)}
    grew = True
    while grew:
        grew = False
        for h in helpers:
            if h.name not in gens and any(isinstance(c, ast.Call) and _is_generator(c, gens, _cli_tuples(h))
                                          or isinstance(c, ast.Name) and c.id in scripts for c in ast.walk(h)):
                gens.add(h.name)
                grew = True
    return gens


class _Taint(ast.NodeVisitor):
    """name -> the generator calls (as source text) its value came from, in one function."""

    def __init__(self, generators: set[str], cli_args: frozenset):
        self.names: dict[str, frozenset[str]] = {}
        self.generators, self.cli_args = generators, cli_args

    def sources(self, node: ast.AST) -> frozenset[str]:
        out: set[str] = set()
        for n in ast.walk(node):
            if isinstance(n, ast.Call) and _is_generator(n, self.generators, self.cli_args):
                out.add(ast.unparse(n))
            elif isinstance(n, ast.Name) and n.id in self.names:
                out |= self.names[n.id]
        return frozenset(out)

    def _bind(self, target: ast.AST, src: frozenset[str]) -> None:
        for n in ast.walk(target):
            if isinstance(n, ast.Name) and src:
                self.names[n.id] = self.names.get(n.id, frozenset()) | src

    def visit_Assign(self, node):
        if isinstance(node.value, ast.Tuple) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Tuple):
            for t, v in zip(node.targets[0].elts, node.value.elts):
                self._bind(t, self.sources(v))
        else:
            for t in node.targets:
                self._bind(t, self.sources(node.value))
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._bind(node.target, self.sources(node.value))
        self.generic_visit(node)

    def visit_For(self, node):
        self._bind(node.target, self.sources(node.iter))
        self.generic_visit(node)

    def visit_With(self, node):
        for item in node.items:
            if item.optional_vars is not None:
                self._bind(item.optional_vars, self.sources(item.context_expr))
        self.generic_visit(node)

    def visit_Expr(self, node):   # text.append(r.text) and the like
        v = node.value
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute) and isinstance(v.func.value, ast.Name):
            self._bind(v.func.value, self.sources(ast.Tuple(elts=list(v.args), ctx=ast.Load())))
        self.generic_visit(node)


def text_comparisons(func: ast.FunctionDef, generators: set[str] = GENERATORS) -> list[int]:
    """Line numbers of comparisons of two generated values from different calls in func."""
    taint = _Taint(generators, _cli_tuples(func))
    for _ in range(2):   # twice: a name bound late in a loop may feed one bound earlier
        taint.visit(func)
    lines = []
    for node in ast.walk(func):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for (a, b), op in zip(zip(operands, operands[1:]), node.ops):
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                continue
            sa, sb = taint.sources(a), taint.sources(b)
            if sa and sb and not (sa == sb and len(sa) == 1):
                lines.append(node.lineno)
    return lines


def _fixture_params(tree: ast.Module) -> dict[str, set[str]]:
    """fixture name -> the fixtures it requests (its parameters), for fixtures defined in this file."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list):
            out[node.name] = {a.arg for a in node.args.args}
    return out


def _requests(direct: set[str], fixtures: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(direct)
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(fixtures.get(f, ()))
    return seen


def offenders(source: str, filename: str = "<test>", shared_fixtures: dict | None = None) -> list[str]:
    tree = ast.parse(source)
    fixtures = {**(shared_fixtures or {}), **_fixture_params(tree)}
    generators = module_generators(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            wanted = _requests({a.arg for a in node.args.args}, fixtures)
            if any(w.startswith("margin") for w in wanted):
                continue
            out += [f"{filename}:{line} {node.name}" for line in text_comparisons(node, generators)]
    return out


def _conftest_fixtures() -> dict[str, set[str]]:
    return _fixture_params(ast.parse((TESTS / "conftest.py").read_text()))


def test_every_text_comparison_uses_the_margin_model():
    shared = _conftest_fixtures()
    bad = []
    for path in sorted(TESTS.glob("test_*.py")):
        bad += offenders(path.read_text(), path.name, shared)
    assert not bad, "compare generated text only with a margin_* fixture (tests/margin.py):\n" + "\n".join(bad)


OLD_WAY = '''
def test_serve_matches_run(server, tiny_builds):
    r = server.client().chat.completions.create(model="m", messages=[])
    ref = json.loads(run_cli("run", tiny_builds["q4_0"], "hi", "--json").stdout)
    assert r.choices[0].message.content == ref["text"]

def test_stream_vs_whole(runner):
    pieces = []
    for r in runner.stream(tokens, greedy):
        pieces.append(r.text)
    whole = list(generate_text(runner, "hi", greedy))[-1]
    assert "".join(pieces) == whole.text
'''
NEW_WAY = OLD_WAY.replace("(server, tiny_builds)", "(server, margin_builds)").replace("(runner)", "(margin_runner)")
SAME_PATH = '''
def test_seeded(tiny_builds):
    args = ("run", tiny_builds["q8_0"], "Once", "--seed", "3")
    assert run_cli(*args).stdout == run_cli(*args).stdout
    a, b = run_cli(*args), run_cli(*args)
    assert a.stdout == b.stdout and a.returncode == 0
'''


def test_the_rule_catches_a_test_written_the_old_way():
    assert offenders(OLD_WAY) == ["<test>:5 test_serve_matches_run", "<test>:12 test_stream_vs_whole"]
    assert offenders(NEW_WAY) == []
    assert offenders(SAME_PATH) == []   # one path twice is not two paths
    # a fixture that itself requests a margin fixture counts, as pytest resolves it
    via = OLD_WAY.replace("(server, tiny_builds)", "(server, tiny_builds, served)")
    assert offenders(via, shared_fixtures={"served": {"margin_builds"}}) == ["<test>:12 test_stream_vs_whole"]
