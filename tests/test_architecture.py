"""Architecture checks: static analysis of kdistill's source with ``ast`` (nothing is imported).

1. no import cycle among kdistill's modules, counting every import statement;
2. layering, one way: data -> models -> methods -> engine -> study -> report/cli;
3. no function longer than MAX_FUNCTION_LINES lines unless it says why (``long: <reason>``);
4. no distillation-method name as a string literal outside kdistill/methods/;
5. no import of a kdistill module inside a function unless marked ``# lazy: <reason>``.

Each check lists every offender as ``path:line`` and what. The self-tests at the end run the
same code on hand-made packages, so that the checker itself is trusted.

How an import becomes an edge of the graph (an edge ``a -> b``: running ``a`` may run ``b``):

* ``import p.q.m`` and ``from p.q.m import name`` run ``p``, ``p.q`` and ``p.q.m``;
  ``from p.q import m`` where ``p.q.m`` is a module runs ``p``, ``p.q`` and ``p.q.m``.
* The packages a module sits in (its ancestors) are already being imported whenever the
  module runs, so implicit edges to them are dropped: ``kdistill/methods/kd.py`` importing
  ``kdistill.methods.base`` does not re-enter ``kdistill/methods/__init__.py``, and no
  submodule re-enters ``kdistill/__init__.py`` by importing a sibling. A module outside the
  package does run the package's ``__init__``: ``kdistill.cli`` importing
  ``kdistill.methods.kd`` has edges to ``kdistill.methods`` and ``kdistill.methods.kd``.
* ``from P import NAME`` where ``P.NAME`` is not a module needs ``P``'s ``__init__`` to have
  run to its end, so that edge is kept even from inside ``P``: ``from kdistill import distill``
  in a submodule is an edge to ``kdistill``; ``from kdistill import distributed`` is an edge
  to ``kdistill.distributed`` only.
* Every import counts: top level, inside functions, under ``if TYPE_CHECKING:``, relative.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kdistill"

# --- the rules, in one place -------------------------------------------------------------

# bottom-level utilities: any layer may import them; they import only each other
BOTTOM: tuple[str, ...] = (
    "kdistill.errors",  # exception classes
    "kdistill.files",  # atomic writes
    "kdistill.configbase",  # StrictConfig, the pydantic base of every config, and its error wording
    "kdistill.progress",  # log() and progress bars
    "kdistill.distributed",  # process-group helpers over torch.distributed; imports only errors
    "kdistill.perf",  # the allocator's tuning
    "kdistill.stats",  # confidence intervals and paired tests of gains
)

# The layers from the bottom up: a module may import its own layer and the layers below it.
# The report reads run directories alone, so it sits low and knows nothing of training.
LAYER_ORDER: tuple[tuple[str, ...], ...] = (
    BOTTOM,
    ("kdistill.data",),
    ("kdistill.models",),
    ("kdistill.methods",),
    ("kdistill.config",),
    ("kdistill.logger", "kdistill.report"),
    (
        "kdistill.checkpoint",
        "kdistill.budget",
        "kdistill.evaluate",
        "kdistill.ema",
        "kdistill.teacher_cache",
        "kdistill.tasks",
        "kdistill.export",
    ),
    ("kdistill.engine",),
    ("kdistill.api",),
    ("kdistill.runs",),
    ("kdistill.study",),
    ("kdistill.commands", "kdistill.sweep"),
    ("kdistill.cli", "kdistill.__main__", "kdistill.bench"),
)

# layer -> the prefixes its modules may import (a prefix matches the module and its submodules)
LAYERS: dict[str, tuple[str, ...]] = {
    **{bottom: BOTTOM for bottom in BOTTOM},
    **{
        module: tuple(m for lower in LAYER_ORDER[: i + 1] for m in lower)
        for i, layer in enumerate(LAYER_ORDER[1:], start=1)
        for module in layer
    },
}

MAX_FUNCTION_LINES = 80
# a longer function says why at its top: the first paragraph of its docstring, or a comment
# between its ``def`` line and its first statement, has ``long: <reason>``
LONG_MARK = re.compile(r"(?<![\w-])long:\s*\S", re.IGNORECASE)
# an import of a kdistill module inside a function says why, on one of its own lines
LAZY_MARK = re.compile(r"#\s*lazy:\s*\S")
# optional third-party packages that may be imported inside functions (check 5 counts only
# kdistill's own modules; these are named here for the reader)
OPTIONAL_THIRD_PARTY = frozenset({"onnx", "onnxruntime", "matplotlib", "tensorboard", "scipy"})

METHODS_PACKAGE = "kdistill/methods"  # method names may be written as strings only here
NO_LITERAL_SKIP = ("kdistill/methods/", "kdistill/configs/")


# --- reading a package -------------------------------------------------------------------


@dataclass(frozen=True)
class Module:
    name: str  # dotted: kdistill.methods.kd; a package's __init__ is the package's name
    path: str  # for messages: kdistill/methods/kd.py
    source: str
    is_package: bool
    tree: ast.Module = field(repr=False)

    @property
    def package(self) -> str:
        """The package that relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]


def modules_from_sources(sources: dict[str, str]) -> dict[str, Module]:
    """``{"pkg/__init__.py": source, "pkg/a.py": source, ...}`` -> modules by dotted name."""
    modules = {}
    for path, source in sources.items():
        parts = path.removesuffix(".py").split("/")
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join(parts)
        modules[name] = Module(name, path, source, is_package, ast.parse(source, filename=path))
    return modules


def read_package(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Module]:
    files = sorted((root / package).rglob("*.py"))
    return modules_from_sources({p.relative_to(root).as_posix(): p.read_text() for p in files})


def comments(source: str) -> dict[int, str]:
    """line number -> the comment on that line (real comments, not ``#`` inside strings)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string
    return out


def function_nodes(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def nodes_inside_functions(tree: ast.AST) -> set[int]:
    """ids of the nodes that sit inside a function body (at any depth)."""
    inside: set[int] = set()
    for fn in function_nodes(tree):
        for stmt in fn.body:
            inside.update(id(n) for n in ast.walk(stmt))
    return inside


# --- imports -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    importer: str
    path: str
    line: int
    end_line: int
    text: str  # the statement, one line
    edges: tuple[str, ...]  # modules of the package that this statement may run (see top)
    internal: bool  # names a module of the package (absolute or relative)
    in_function: bool


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def resolve_imports(modules: dict[str, Module], package: str) -> list[Import]:
    out = []
    for mod in modules.values():
        inside = nodes_inside_functions(mod.tree)
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Import):
                named = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                named = [(target, [a.name for a in node.names])]
            else:
                continue
            explicit: list[str] = []
            implicit: list[str] = []
            internal = False
            for target, names in named:
                if not _in_package(target, package):
                    continue
                internal = True
                implicit += _ancestors(target)
                if names is None:  # import p.q.m
                    explicit.append(target)
                    continue
                subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
                explicit += subs
                if len(subs) < len(names):  # a name (or *) from target's own namespace
                    explicit.append(target)
                else:
                    implicit.append(target)
            own = {mod.name, *_ancestors(mod.name)}
            edges = [t for t in explicit if t != mod.name]
            edges += [t for t in implicit if t not in own]
            out.append(
                Import(
                    importer=mod.name,
                    path=mod.path,
                    line=node.lineno,
                    end_line=node.end_lineno or node.lineno,
                    text=" ".join(ast.unparse(node).split()),
                    edges=tuple(dict.fromkeys(edges)),
                    internal=internal,
                    in_function=id(node) in inside,
                )
            )
    return sorted(out, key=lambda i: (i.path, i.line))


Graph = dict[str, dict[str, list[str]]]  # importer -> imported -> ["path:line", ...]


def import_graph(modules: dict[str, Module], package: str) -> Graph:
    graph: Graph = {name: {} for name in modules}
    for imp in resolve_imports(modules, package):
        for target in imp.edges:
            graph[imp.importer].setdefault(target, []).append(f"{imp.path}:{imp.line}")
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's algorithm; components with a cycle only (2+ modules, or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def find_cycles(graph: Graph, limit: int = 500) -> list[list[str]]:
    """Every elementary cycle (up to ``limit``), each as [a, b, ..., a] starting at its
    smallest module, shortest first."""
    cycles: list[list[str]] = []
    for comp in strongly_connected(graph):
        for start in comp:  # the cycles whose smallest module is start
            allowed = {m for m in comp if m >= start}
            _cycles_from(graph, [start], allowed, cycles, limit)
    return sorted(cycles, key=lambda c: (len(c), c))


def _cycles_from(graph: Graph, path: list[str], allowed: set[str], out: list, limit: int) -> None:
    for w in sorted(graph[path[-1]]):
        if len(out) >= limit:
            return
        if w == path[0]:
            out.append([*path, w])
        elif w in allowed and w not in path:
            _cycles_from(graph, [*path, w], allowed, out, limit)


def format_cycle(graph: Graph, cycle: list[str]) -> str:
    chain = " -> ".join(cycle)
    where = ", ".join(graph[a][b][0] for a, b in zip(cycle, cycle[1:], strict=False))
    return f"{chain}    [{where}]"


# --- function lengths --------------------------------------------------------------------


def function_length(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """From the ``def`` line (not the decorators) to the last line of the body."""
    return fn.end_lineno - fn.lineno + 1


def says_long(fn: ast.FunctionDef | ast.AsyncFunctionDef, line_comments: dict[int, str]) -> bool:
    doc = ast.get_docstring(fn)
    if doc and LONG_MARK.search(doc.split("\n\n")[0]):
        return True
    body = fn.body[1:] if doc is not None else fn.body
    first = body[0].lineno if body else fn.end_lineno + 1
    return any(LONG_MARK.search(c) for ln, c in line_comments.items() if fn.lineno <= ln < first)


def long_functions(modules: dict[str, Module], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for mod in modules.values():
        line_comments = comments(mod.source)
        parents = {id(c): p for p in ast.walk(mod.tree) for c in ast.iter_child_nodes(p)}
        for fn in function_nodes(mod.tree):
            n = function_length(fn)
            if n > limit and not says_long(fn, line_comments):
                out.append((mod.path, fn.lineno, f"{_qualname(fn, parents)}: {n} lines"))
    return [f"{p}:{ln}  {what}" for p, ln, what in sorted(out)]


def _qualname(node: ast.AST, parents: dict[int, ast.AST]) -> str:
    names = []
    while node is not None and not isinstance(node, ast.Module):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        node = parents.get(id(node))
    return ".".join(reversed(names))


# --- method names as strings -------------------------------------------------------------


def method_names(modules: dict[str, Module], methods_dir: str = METHODS_PACKAGE) -> set[str]:
    """The ``name = "..."`` class attributes of the method classes: the registry's keys."""
    names = set()
    for mod in modules.values():
        if not mod.path.startswith(methods_dir + "/"):
            continue
        for cls in (n for n in ast.walk(mod.tree) if isinstance(n, ast.ClassDef)):
            for stmt in cls.body:
                if isinstance(stmt, ast.Assign):
                    targets, value = stmt.targets, stmt.value
                elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                    targets, value = [stmt.target], stmt.value
                else:
                    continue
                if (
                    any(isinstance(t, ast.Name) and t.id == "name" for t in targets)
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    names.add(value.value)
    return names


def method_name_literals(
    modules: dict[str, Module], names: Iterable[str], skip: tuple[str, ...] = NO_LITERAL_SKIP
) -> list[str]:
    names = set(names)
    if not names:
        return []
    alternatives = "|".join(map(re.escape, sorted(names)))
    dotted = re.compile(rf"distill\.methods\.({alternatives})(?!\w)")
    out = []
    for mod in modules.values():
        if mod.path.startswith(skip):
            continue
        string_statements = {  # docstrings and other bare strings: prose, not values
            id(n.value) for n in ast.walk(mod.tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
        }
        for node in ast.walk(mod.tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            if id(node) in string_statements:
                continue
            if node.value in names or dotted.search(node.value):
                out.append((mod.path, node.lineno, node.col_offset, node.value))
    return [f"{p}:{ln}:{col + 1}  {v!r}" for p, ln, col, v in sorted(out)]


# --- imports inside functions ------------------------------------------------------------


def function_level_imports(modules: dict[str, Module], package: str) -> list[str]:
    sources = {m.path: m.source.splitlines() for m in modules.values()}
    out = []
    for imp in resolve_imports(modules, package):
        if not (imp.in_function and imp.internal):
            continue
        lines = sources[imp.path][imp.line - 1 : imp.end_line]
        marked = any(LAZY_MARK.search(c) for c in _line_comments(lines))
        if not marked:
            out.append(f"{imp.path}:{imp.line}  {imp.text}")
    return out


def _line_comments(lines: list[str]) -> list[str]:
    found = comments("\n".join(lines) + "\n") if lines else {}
    return list(found.values())


def layer_of(name: str, layers: dict[str, tuple[str, ...]]) -> str | None:
    matches = [layer for layer in layers if _in_package(name, layer)]
    return max(matches, key=len) if matches else None


def layering_breaks(modules: dict[str, Module], package: str, layers: dict[str, tuple[str, ...]]) -> list[str]:
    out = []
    for imp in resolve_imports(modules, package):
        layer = layer_of(imp.importer, layers)
        if layer is None:
            continue
        bad = [t for t in imp.edges if not any(_in_package(t, ok) for ok in layers[layer])]
        if bad:
            out.append(f"{imp.path}:{imp.line}  [{layer}] -> {', '.join(bad)}    ({imp.text})")
    return out


# --- the checks on kdistill --------------------------------------------------------------

KDISTILL = read_package()


def _report(title: str, items: list[str]) -> str:
    return f"{title}: {len(items)}\n" + "\n".join(f"  {i}" for i in items)


def test_no_import_cycles():
    graph = import_graph(KDISTILL, PACKAGE)
    components = strongly_connected(graph)
    cycles = find_cycles(graph)
    groups = [" ".join(c) for c in components]
    assert not components, (
        _report("groups of modules that import each other", groups)
        + "\n"
        + _report("import cycles (first import of each step in brackets)", [format_cycle(graph, c) for c in cycles])
    )


def test_layering():
    breaks = layering_breaks(KDISTILL, PACKAGE, LAYERS)
    assert not breaks, _report("imports against the layering (layer -> modules it may not import)", breaks)


def test_no_long_functions():
    found = long_functions(KDISTILL)
    assert not found, _report(f"functions over {MAX_FUNCTION_LINES} lines without 'long: <reason>' at their top", found)


def test_method_names_only_in_methods_package():
    names = method_names(KDISTILL)
    assert {"kd", "dkd", "fitnets", "crd"} <= names, f"method names not found: {sorted(names)}"
    found = method_name_literals(KDISTILL, names)
    assert not found, _report(f"method names {sorted(names)} as string literals outside {METHODS_PACKAGE}/", found)


def test_no_kdistill_imports_inside_functions():
    found = function_level_imports(KDISTILL, PACKAGE)
    per_file: dict[str, int] = {}
    for item in found:
        path = item.split(":", 1)[0]
        per_file[path] = per_file.get(path, 0) + 1
    counts = [f"{p}: {n}" for p, n in sorted(per_file.items())]
    assert not found, (
        _report("kdistill imports inside functions without '# lazy: <reason>'", found)
        + "\n"
        + _report("per file", counts)
    )


# --- self-tests of the checker -----------------------------------------------------------


def _pkg(**files: str) -> dict[str, Module]:
    """_pkg(__init__="...", a="...", sub__x="...") -> pkg/__init__.py, pkg/a.py, pkg/sub/x.py"""
    sources = {}
    for key, source in files.items():
        rel = key.replace("__init__", "\0").replace("__", "/").replace("\0", "__init__")
        sources[f"pkg/{rel}.py"] = source
    return modules_from_sources(sources)


def _cycles(modules: dict[str, Module]) -> list[str]:
    return [" -> ".join(c) for c in find_cycles(import_graph(modules, "pkg"))]


def test_self_cycle_through_a_function_level_import():
    mods = _pkg(
        __init__="from pkg.a import f\n",
        a="def f():\n    from pkg import b\n    return b\n",
        b="from pkg.a import f\n",
    )
    assert _cycles(mods) == ["pkg.a -> pkg.b -> pkg.a"]
    assert strongly_connected(import_graph(mods, "pkg")) == [["pkg.a", "pkg.b"]]


def test_self_no_cycle_between_siblings_through_their_package():
    # a package's submodules import each other and the package imports them: no cycle
    mods = _pkg(
        __init__="from pkg import a\nfrom pkg.b import g\nimport pkg.sub.x\n",
        a="X = 1\n",
        b="from pkg import a\nfrom pkg.a import X\n",
        sub____init__="from pkg.sub.x import Y\n",
        sub__x="from pkg.sub import y\nimport pkg.sub.y\nfrom .y import Z\nfrom pkg.b import g\n",
        sub__y="Z = 2\n",
    )
    assert _cycles(mods) == []


def test_self_non_module_name_from_a_package_is_an_edge_to_its_init():
    mods = _pkg(__init__="from pkg.a import f\ndef g(): pass\n", a="from pkg import g\ndef f(): pass\n")
    assert _cycles(mods) == ["pkg -> pkg.a -> pkg"]
    mods = _pkg(  # the same in a subpackage, from a module inside it
        __init__="", sub____init__="from pkg.sub.a import f\nV = 1\n", sub__a="from pkg.sub import V\n"
    )
    assert _cycles(mods) == ["pkg.sub -> pkg.sub.a -> pkg.sub"]


def test_self_a_subpackage_init_runs_when_imported_from_outside():
    mods = _pkg(
        __init__="",
        sub____init__="from pkg.sub.x import X\n",
        sub__x="from pkg.y import Y\nX = 1\n",
        sub__z="Z = 1\n",
        y="import pkg.sub.z\nY = 1\n",  # runs pkg/sub/__init__.py first
    )
    assert _cycles(mods) == ["pkg.sub -> pkg.sub.x -> pkg.y -> pkg.sub"]


def test_self_relative_imports_and_every_cycle_listed():
    mods = _pkg(
        __init__="",
        a="from . import b\nfrom .c import C\n",
        b="from .a import A\n",
        c="def f():\n    from .a import A\n",
        sub____init__="",
        sub__x="from .. import b\nfrom ..a import A\n",
    )
    assert _cycles(mods) == ["pkg.a -> pkg.b -> pkg.a", "pkg.a -> pkg.c -> pkg.a"]
    graph = import_graph(mods, "pkg")
    assert format_cycle(graph, ["pkg.a", "pkg.b", "pkg.a"]) == ("pkg.a -> pkg.b -> pkg.a    [pkg/a.py:1, pkg/b.py:1]")


def test_self_function_length_and_long_mark():
    source = '''\
@decorator
def five(x):
    y = x

    return y


def with_doc(x):
    """Long: one table of options."""
    return x


def with_comment(
    x,  # long: a comment in the signature counts
):
    return x


def comment_after_doc():
    """Not marked here."""
    # long: marked right under the docstring
    return 1


def too_late():
    a = 1
    # long: a comment further down does not count
    return a


def not_marked():
    """Says nothing about its length in the first paragraph.

    long: a later paragraph does not count
    """
    return 2


class C:
    async def method(self):
        def inner():
            pass
        return inner
'''
    mods = modules_from_sources({"pkg/m.py": source})
    fns = {fn.name: fn for fn in function_nodes(mods["pkg.m"].tree)}
    assert function_length(fns["five"]) == 4
    assert function_length(fns["method"]) == 4
    assert function_length(fns["inner"]) == 2
    marks = comments(source)
    marked = {name for name, fn in fns.items() if says_long(fn, marks)}
    assert marked == {"with_doc", "with_comment", "comment_after_doc"}
    assert long_functions(mods, limit=3) == [
        "pkg/m.py:2  five: 4 lines",
        "pkg/m.py:25  too_late: 4 lines",
        "pkg/m.py:31  not_marked: 6 lines",
        "pkg/m.py:40  C.method: 4 lines",
    ]


def test_self_function_level_imports_and_lazy_mark():
    mods = _pkg(
        __init__="",
        a=(
            "import json\n"
            "from pkg import b\n"
            "def f():\n"
            "    import onnx\n"
            "    from pkg.b import X  # lazy: b is slow to import\n"
            "    from pkg.b import (  # lazy: same, over two lines\n"
            "        Y,\n"
            "    )\n"
            "    from . import b\n"
            "    import pkg.b  # imported here\n"
            "    return X, Y, onnx, json\n"
        ),
        b="X = Y = 1\n",
    )
    assert function_level_imports(mods, "pkg") == ["pkg/a.py:9  from . import b", "pkg/a.py:10  import pkg.b"]


def test_self_method_name_literals():
    mods = modules_from_sources(
        {
            "pkg/methods/kd.py": 'class KD:\n    name = "kd"\n',
            "pkg/methods/at.py": 'class AT:\n    name: str = "at"\n',
            "pkg/cli.py": (
                '"""Methods: "kd" and "at" in a docstring are fine."""\n'
                'DEFAULT = ("kd", "at")\n'
                'MESSAGE = "look at this"\n'
                'PATH = "kdistill.methods.kd"\n'
                'OTHER = "kdistill.methods.kdx"\n'
                "def f():\n"
                '    """kd"""\n'
                '    return {"kd": 1}\n'
            ),
        }
    )
    names = method_names(mods, methods_dir="pkg/methods")
    assert names == {"kd", "at"}
    assert method_name_literals(mods, names, skip=("pkg/methods/",)) == [
        "pkg/cli.py:2:12  'kd'",
        "pkg/cli.py:2:18  'at'",
        "pkg/cli.py:4:8  'kdistill.methods.kd'",
        "pkg/cli.py:8:13  'kd'",
    ]


def test_self_layering():
    mods = _pkg(
        __init__="",
        errors="",
        data____init__="",
        data__x="from pkg.errors import E\nfrom pkg.models import m\nfrom pkg import cli\n",
        models____init__="",
        models__m="from pkg.data import x\n",
        cli="from pkg.models import m\n",
    )
    layers = {"pkg.data": ("pkg.errors", "pkg.data"), "pkg.models": ("pkg.errors", "pkg.data", "pkg.models")}
    assert layer_of("pkg.data.x", layers) == "pkg.data"
    assert layer_of("pkg.datax", layers) is None
    assert layering_breaks(mods, "pkg", layers) == [
        "pkg/data/x.py:2  [pkg.data] -> pkg.models.m, pkg.models    (from pkg.models import m)",
        "pkg/data/x.py:3  [pkg.data] -> pkg.cli    (from pkg import cli)",
    ]
