"""Fail when the notebooks are unclean, the library is out of sync with them, or README.md is stale.

Runs `nbdev-export`, `nbdev-clean` and `tools/make_readme.py`, then compares every notebook, every
library file and README.md with what was there before. Whatever they changed is left changed (so a
developer can commit it); the exit status is 1 if anything changed. `--fix` exits 0 either way."""
import hashlib, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def snapshot() -> dict:
    files = [*ROOT.glob('nbs/**/*.ipynb'), *ROOT.glob('cream_nb/**/*.py'), ROOT/'README.md']
    return {str(f.relative_to(ROOT)): hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
            for f in files if '.ipynb_checkpoints' not in f.parts}

def main():
    before = snapshot()
    for cmd in ([str(BIN/'nbdev-export')], [str(BIN/'nbdev-clean')], [sys.executable, str(ROOT/'tools/make_readme.py')]):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            print(f"`{' '.join(cmd)}` failed:\n{r.stdout}{r.stderr}"); sys.exit(r.returncode)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if not changed:
        print("notebooks clean, library in sync, README.md current"); return
    print("These files changed under nbdev-export / nbdev-clean / make_readme:")
    for f in changed: print("   ", f)
    if '--fix' not in sys.argv:
        print("The notebooks were unclean or the library/README out of sync: commit the files above.")
        sys.exit(1)

if __name__ == '__main__': main()
