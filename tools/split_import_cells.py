"""Split notebook cells that mix imports with other code, keeping the outputs (no re-execution).

nbdev's doc processor executes every cell containing an import, without the cells before it; a cell that
also uses earlier names then breaks the docs build. Usage: python tools/split_import_cells.py nbs/X.ipynb ..."""
import re, sys
import nbformat

IMPORT = re.compile(r'(import |from \S+ import )')

def split_nb(path) -> int:
    nb = nbformat.read(path, as_version=4); out, n = [], 0
    for c in nb.cells:
        lines = c.source.splitlines()
        if c.cell_type != 'code' or any(l.replace(' ', '').startswith(('#|export', '#|default_exp', '#|exporti')) for l in lines):
            out.append(c); continue
        direc = [l for l in lines if l.startswith('#|')]
        imp = [l for l in lines if IMPORT.match(l)]
        rest = [l for l in lines if not l.startswith('#|') and not IMPORT.match(l)]
        if imp and any(l.strip() and not l.lstrip().startswith('#') for l in rest):
            out.append(nbformat.v4.new_code_cell('\n'.join(direc + imp)))
            c.source = '\n'.join(direc + rest).strip('\n'); out.append(c); n += 1
        else: out.append(c)
    nb.cells = out
    nbformat.write(nb, path)
    return n

if __name__ == '__main__':
    for p in sys.argv[1:]: print(p, split_nb(p), 'cells split')
