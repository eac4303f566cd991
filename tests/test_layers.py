"""The package's layers (DEVELOPING.md): each module imports only modules of its own layer or of the layers below,
and the import graph, counting every import (function-local ones too), has no cycle. Read with `ast`, nothing imported."""
import ast, sys
from pathlib import Path
import pytest

PKG = Path(__file__).resolve().parents[1]/'cream_nb'
LAYERS = ['core', 'data', 'models', 'stages', 'methods', 'runs', 'reporting', 'cli']   # bottom to top
MAX_LOCAL = 26       # function-local imports of the package's own modules: only to keep `import cream_nb.methods` (and `cream --help`) free of torch (meta and temporal: 3 each, the stages they call)
MAX_LINES = 450

def modules(pkg=PKG) -> dict:
    "module name -> path, for every module of the package but nbdev's generated index"
    out = {}
    for p in sorted(pkg.rglob('*.py')):
        if p.name == '_modidx.py': continue
        parts = p.relative_to(pkg.parent).with_suffix('').parts
        out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = p
    return out

def layer(mod:str) -> int:
    "the layer index of `cream_nb.<layer>...` (the package itself is below everything)"
    parts = mod.split('.')
    return -1 if len(parts) == 1 else LAYERS.index(parts[1])

def imports(mods:dict) -> list:
    "(importer, imported, line, function-local?) for every import of a package module"
    out = []
    for name, p in mods.items():
        tree = ast.parse(p.read_text())
        def visit(node, local):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)): visit(ch, True); continue
                if isinstance(ch, (ast.Import, ast.ImportFrom)):
                    for t in _targets(name, p, ch, mods): out.append((name, t, ch.lineno, local))
                visit(ch, local)
        visit(tree, False)
    return out

def _targets(name, path, node, mods) -> set:
    if isinstance(node, ast.Import): cands = [a.name for a in node.names]
    else:
        pkg = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
        base = '.'.join(pkg[:len(pkg) - node.level + 1]) if node.level else ''
        mod = '.'.join(x for x in (base, node.module or '') if x)
        cands = [mod] + [f'{mod}.{a.name}' for a in node.names]
    out = set()
    for c in cands:
        while c and c not in mods: c = c.rpartition('.')[0]
        if c and c != name and c != 'cream_nb': out.add(c)
    return out

def cycles(edges:dict) -> list:
    "strongly connected components with more than one module (Tarjan)"
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
    def sc(v):
        index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(edges):
        if v not in index: sc(v)
    return out

MODS = modules()
IMPORTS = imports(MODS)

def test_no_upward_import():
    bad = [f'{a} (layer {LAYERS[layer(a)]}) imports {b} (layer {LAYERS[layer(b)]}) at line {ln}'
           for a, b, ln, _ in IMPORTS if layer(b) > layer(a)]
    assert not bad, 'imports of a higher layer:\n' + '\n'.join(bad)

def test_no_cycle():
    edges = {}
    for a, b, _, _ in IMPORTS: edges.setdefault(a, set()).add(b)
    found = cycles(edges)
    assert not found, 'import cycles:\n' + '\n'.join(' -> '.join(c) for c in found)

def test_few_function_local_imports():
    local = [f'{a}:{ln} imports {b}' for a, b, ln, loc in IMPORTS if loc]
    assert len(local) <= MAX_LOCAL, f'{len(local)} function-local imports of the package (at most {MAX_LOCAL}):\n' + '\n'.join(local)

def test_no_standard_library_name():
    shadow = [m for m in MODS if m.rpartition('.')[2] in sys.stdlib_module_names]
    assert not shadow, f'modules named after standard-library modules: {shadow}'

def test_small_modules():
    big = {m: n for m, p in MODS.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f'modules over {MAX_LINES} lines: {big}'

def test_the_checks_can_fail(tmp_path):
    "The same functions find a planted cycle and a planted upward import."
    pkg = tmp_path/'cream_nb'
    for sub, src in {'core/a.py': 'from ..core import b\n', 'core/b.py': 'def f():\n    from cream_nb.core import a\n',
                     'runs/r.py': '', 'core/c.py': 'from cream_nb.runs.r import x\n'}.items():
        (pkg/sub).parent.mkdir(parents=True, exist_ok=True); (pkg/sub).write_text(src)
    mods = modules(pkg); imps = imports(mods)
    edges = {}
    for a, b, _, _ in imps: edges.setdefault(a, set()).add(b)
    assert cycles(edges) == [['cream_nb.core.a', 'cream_nb.core.b']]
    assert [(a, b) for a, b, _, _ in imps if layer(b) > layer(a)] == [('cream_nb.core.c', 'cream_nb.runs.r')]
    assert [(a, b, loc) for a, b, _, loc in imps if loc] == [('cream_nb.core.b', 'cream_nb.core.a', True)]
