"""Author notebooks as jupytext 'percent' scripts, keep the .ipynb as the source of truth.

    python tools/nb.py build DRAFT.py nbs/NN_name.ipynb   # percent script -> notebook, executed, cleaned, exported
    python tools/nb.py draft nbs/NN_name.ipynb DRAFT.py   # notebook -> percent script for editing
    python tools/nb.py run nbs/NN_name.ipynb              # re-execute a notebook in place (outputs kept for the docs)

Notebooks execute with nbs/ as the working directory, as nbdev-test runs them."""
import subprocess, sys
from pathlib import Path
import jupytext, nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def _no_eval(cell) -> bool:
    "Cells nbdev-test would not run: `#| eval: false`."
    return cell.cell_type == 'code' and any(l.replace(' ', '').lower() == '#|eval:false' for l in cell.source.splitlines())

def run(nb_path: Path, timeout=1800):
    nb = nbformat.read(nb_path, as_version=4)
    skipped = {i: c.source for i, c in enumerate(nb.cells) if _no_eval(c)}
    for i in skipped: nb.cells[i].source = ''
    # store_widget_state=False: a live widget is re-created when its cell runs; saved state (plotly's FigureWidget
    # carries its 5 MB JavaScript bundle in each model) would make the notebook undiffable.
    NotebookClient(nb, timeout=timeout, kernel_name='python3', store_widget_state=False,
                   resources={'metadata': {'path': str(nb_path.parent)}}).execute()
    nb.metadata.pop('widgets', None)
    for i, src in skipped.items(): nb.cells[i].source, nb.cells[i].outputs, nb.cells[i].execution_count = src, [], None
    nbformat.write(nb, nb_path)
    subprocess.run([str(BIN/'nbdev-clean'), '--fname', str(nb_path)], cwd=ROOT, check=True)
    subprocess.run([str(BIN/'nbdev-export')], cwd=ROOT, check=True)

def keep_ids(nb, old_path: Path):
    "Cells whose source is unchanged keep the id they had in `old_path`, so a rebuilt notebook diffs (and merges) by cell."
    if not old_path.exists(): return nb
    free = {}
    for c in nbformat.read(old_path, as_version=4).cells: free.setdefault((c.cell_type, c.source), []).append(c.get('id'))
    for c in nb.cells:
        ids = free.get((c.cell_type, c.source))
        if ids: c['id'] = ids.pop(0)
    return nb

def build(src: Path, dst: Path):
    nb = jupytext.read(src, fmt='py:percent')
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    keep_ids(nb, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    subprocess.run([str(BIN/'nbdev-export')], cwd=ROOT, check=True)  # so the notebook can import its own module
    run(dst)

def draft(src: Path, dst: Path):
    nb = nbformat.read(src, as_version=4)
    jupytext.write(nb, dst, fmt='py:percent')

if __name__ == '__main__':
    cmd, *args = sys.argv[1:]
    {'build': build, 'draft': draft, 'run': run}[cmd](*map(Path, args))
