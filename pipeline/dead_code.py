"""Dead-code elimination for the generated train_gpt.py (pipeline.codegen), before minifying.

The bundle carries whole modules, but a submission calls only part of each (pgolf's own commands
use the rest). This pass drops the top-level functions and classes, and the methods, that nothing
left in the bundle can name: starting from everything that is not such a definition (module-level
statements, the wrapper's import of the entry point), a definition is kept once its name occurs in
kept code, and then what its own body names counts too, until nothing more is reached.

"Names" is deliberately broad, so the pass stays sound for Python without type information: any
identifier, attribute or imported name anywhere in kept code, and every identifier-like word in any
string constant (getattr, registries, log lines) or in `extra_roots` (the wrapper, the recipe JSON).
A method is named by its bare name, whatever object it is called on. Never dropped:

- dunder and sunder names (`__init__`, `_missing_`): Python calls them implicitly;
- methods whose name exists on a library base class the bundle derives from (torch.nn.Module's
  `forward`, Optimizer's `step`, Mapping's `get`, ...): the library calls them;
- definitions with a decorator other than property/staticmethod/classmethod/caches/contextmanager
  (a `@register(...)` runs at import and files the object by a string name);
- names listed in a module's `__all__`;
- anything that is not a def or class statement directly in a module or class body (assignments,
  dataclass fields, nested functions, definitions under `if`).

    prune({path: source}, extra_roots="...") -> {path: source with unreachable definitions removed}
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A string that could name code: an identifier, a dotted path or `module:attr`. Prose (log lines,
# error messages) mentions names without calling them.
_NAME_LIKE = re.compile(r"[A-Za-z_]\w*(?:[.:][A-Za-z_]\w*)*")

# Decorators that only wrap the object they decorate (nothing runs at import that could register it).
_PURE_DECORATORS = {"property", "staticmethod", "classmethod", "cache", "lru_cache", "cached_property",
                    "contextmanager", "setter", "getter", "deleter", "no_grad", "wraps"}


@functools.cache
def _library_method_names() -> frozenset[str]:
    """Attribute names of the library classes that bundled classes derive from: a bundled method of
    one of these names may be called by the library itself (Module.__call__ -> forward, ...)."""
    import collections.abc
    import typing

    import torch

    bases = (object, Exception, collections.abc.Mapping, typing.NamedTuple, tuple, torch.nn.Module,
             torch.optim.Optimizer, torch.autograd.Function)
    return frozenset(name for base in bases for name in dir(base))


def _decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _protected(node: ast.stmt, in_class: bool, exported: set[str]) -> bool:
    name = node.name
    if name.startswith("_") and name.endswith("_") and len(name) > 2:
        return True  # dunder / sunder
    if name in exported or (in_class and name in _library_method_names()):
        return True
    return any(_decorator_name(d) not in _PURE_DECORATORS for d in node.decorator_list)


def _words(node: ast.AST) -> set[str]:
    """Every name `node` (without descending into nested definitions' subtrees; the caller
    splits those off) could use: identifiers, attributes, imported names, words in strings."""
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            found.add(n.id)
        elif isinstance(n, ast.Attribute):
            found.add(n.attr)
        elif isinstance(n, ast.alias):
            found.add(n.name.split(".")[0])
            found.update(n.name.split("."))
        elif isinstance(n, ast.Constant) and isinstance(n.value, str):
            found.update(_WORD.findall(n.value)) if _NAME_LIKE.fullmatch(n.value) else None
        elif isinstance(n, ast.keyword) and n.arg:
            found.add(n.arg)
    return found


@dataclass
class _Def:
    path: str
    node: ast.stmt
    parent: "_Def | None"  # the class a method belongs to, when that class is itself droppable
    uses: set[str] = field(default_factory=set)  # names its own code uses (nested droppables excluded)


def _exported(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
    return set()


def _collect(path: str, tree: ast.Module) -> tuple[list[_Def], set[str]]:
    """The droppable definitions of one module and the names its always-kept code uses."""
    defs: list[_Def] = []
    exported = _exported(tree)
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    root_nodes: list[ast.AST] = []

    def split(body, parent, in_class) -> list[ast.AST]:
        """Register the droppable definitions of `body`; return the statements that stay with the owner."""
        owned = []
        for stmt in body:
            if isinstance(stmt, kinds) and not _protected(stmt, in_class, exported if not in_class else set()):
                d = _Def(path, stmt, parent)
                defs.append(d)
                if isinstance(stmt, ast.ClassDef):
                    d.uses = _words_of(split(stmt.body, d, True) + list(stmt.bases) + list(stmt.keywords)
                                       + list(stmt.decorator_list))
                else:
                    d.uses = _words(stmt)
            elif isinstance(stmt, ast.ClassDef) and not in_class:
                # A kept class: its droppable methods are split off, the rest is always-kept code.
                owned += split(stmt.body, parent, True) + list(stmt.bases) + list(stmt.keywords) \
                    + list(stmt.decorator_list)
            else:
                owned.append(stmt)
        return owned

    root_nodes = split(tree.body, None, False)
    return defs, _words_of(root_nodes)


def _words_of(nodes) -> set[str]:
    found: set[str] = set()
    for n in nodes:
        found |= _words(n)
    return found


def dead_definitions(sources: dict[str, str], extra_roots: str = "") -> dict[str, list[ast.stmt]]:
    """{path: [def/class nodes nothing reachable names]} for the modules in `sources`."""
    defs: list[_Def] = []
    names = set(_WORD.findall(extra_roots))
    for path, source in sources.items():
        found, used = _collect(path, ast.parse(source, path))
        defs += found
        names |= used
    alive: set[int] = set()  # ids of the reached definitions
    changed = True
    while changed:
        changed = False
        for d in defs:
            if id(d) in alive or d.node.name not in names or (d.parent is not None and id(d.parent) not in alive):
                continue
            alive.add(id(d))
            names |= d.uses
            changed = True
    dead: dict[str, list[ast.stmt]] = {}
    for d in defs:
        # a dead class's methods go with it
        if id(d) not in alive and (d.parent is None or id(d.parent) in alive):
            dead.setdefault(d.path, []).append(d.node)
    return dead


def _remove(source: str, nodes: list[ast.stmt]) -> str:
    lines = source.splitlines(keepends=True)
    for node in sorted(nodes, key=lambda n: n.lineno, reverse=True):
        start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]
        # `pass` keeps a class body that loses its last statement valid; the minifier drops it otherwise.
        lines[start:node.end_lineno] = [f"{indent}pass\n"] if indent else []
    return "".join(lines)


def prune(sources: dict[str, str], extra_roots: str = "") -> dict[str, str]:
    """`sources` with every definition in `dead_definitions` removed (the rest byte-for-byte)."""
    dead = dead_definitions(sources, extra_roots)
    return {path: _remove(source, dead[path]) if path in dead else source for path, source in sources.items()}
