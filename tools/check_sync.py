"""Fail when the notebooks are unclean or undiffable, the library is out of sync with them, or README.md is stale.

Runs `nbdev-export`, `nbdev-clean` and `tools/make_readme.py`, then compares every notebook, every
library file and README.md with what was there before. Whatever they changed is left changed (so a
developer can commit it); the exit status is 1 if anything changed. It also fails when a notebook
carries saved widget state or is larger than MAX_NOTEBOOK_BYTES. `--fix` strips widget state and
exits 0 unless a notebook is still too large."""
import hashlib, json, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_NOTEBOOK_BYTES = 1_000_000  # a notebook a person can review in a diff; the docs show figures statically

def notebooks(root:Path=ROOT) -> list:
    return sorted(f for f in root.glob('nbs/**/*.ipynb') if '.ipynb_checkpoints' not in f.parts and 'runs' not in f.parts)

def notebook_problems(path:Path, max_bytes:int=MAX_NOTEBOOK_BYTES) -> list:
    "What makes notebook `path` undiffable: saved widget state, inlined JavaScript, or its size."
    raw = Path(path).read_bytes()
    nb = json.loads(raw)
    out = []
    if 'widgets' in nb.get('metadata', {}): out.append("saved widget state (metadata.widgets)")
    for cell in nb.get('cells', []):
        for o in cell.get('outputs', []):
            data = o.get('data', {})
            if 'application/javascript' in data or any('plotly.js v' in ''.join(v) for k, v in data.items() if k == 'text/html'):
                out.append(f"inlined JavaScript in an output of cell {cell.get('id')}"); break
    if len(raw) > max_bytes: out.append(f"{len(raw)/1e6:.1f} MB, over the {max_bytes/1e6:.1f} MB limit")
    bad = [i for i, c in enumerate(nb.get('cells', [])) if not isinstance(c.get('id'), str) or not c['id']]
    if bad: out.append(f"cells {bad[:5]} have no id (nbformat 4.5 needs one; the docs build refuses the notebook)")
    return out

def strip_widget_state(path:Path) -> bool:
    "Remove metadata.widgets from notebook `path` in place; True if it was there."
    nb = json.loads(Path(path).read_text())
    if nb.get('metadata', {}).pop('widgets', None) is None: return False
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True

def check_notebooks(paths, fix:bool=False) -> list:
    "One message per notebook that is not diffable (after stripping widget state when `fix`)."
    msgs = []
    for p in paths:
        if fix: strip_widget_state(p)
        probs = notebook_problems(p)
        if probs: msgs.append(f"{Path(p).relative_to(ROOT) if Path(p).is_relative_to(ROOT) else p}: {'; '.join(probs)}")
    return msgs

def snapshot() -> dict:
    files = [*notebooks(), *ROOT.glob('cream_nb/**/*.py'), ROOT/'README.md']
    return {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None for f in files}

def main():
    fix = '--fix' in sys.argv
    bad = check_notebooks(notebooks(), fix=fix)
    if bad:
        print("Notebooks that cannot be reviewed in a diff:")
        for m in bad: print("   ", m)
        print("Fix: `make check-sync` strips saved widget state (or `python tools/check_sync.py --fix`); "
              "re-execute with `python tools/nb.py run NOTEBOOK`, which saves none; keep outputs small.")
        if not fix or check_notebooks(notebooks()): sys.exit(1)
    before = snapshot()
    for cmd in ([str(BIN/'nbdev-export')], [str(BIN/'nbdev-clean')], [sys.executable, str(ROOT/'tools/make_readme.py')]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            print(f"`{' '.join(cmd)}` failed:\n{r.stdout}{r.stderr}"); sys.exit(r.returncode)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not changed:
        print("notebooks clean and diffable, library in sync, README.md current"); return
    print("These files changed under nbdev-export / nbdev-clean / make_readme:")
    for f in changed: print("   ", f)
    if not fix:
        print("The notebooks were unclean or the library/README out of sync: commit the files above.")
        sys.exit(1)

if __name__ == '__main__': main()
