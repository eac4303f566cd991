"""Move the import lines of test/demo cells into a cell of their own (in a jupytext percent draft).

nbdev's doc processor (`exec_show_docs`) executes every cell that contains an import, without the cells
before it, so a cell mixing imports with code that uses earlier names breaks `make docs`."""
import re, sys
from pathlib import Path

def split(text: str) -> str:
    cells = re.split(r'(?m)^(?=# %%)', text)
    out = []
    for c in cells:
        head, _, body = c.partition('\n')
        if not head.startswith('# %%') or '[markdown]' in head or '#| export' in body or '#| default_exp' in body:
            out.append(c); continue
        lines = body.split('\n')
        imp = [l for l in lines if re.match(r'(import |from \S+ import )', l)]
        rest = [l for l in lines if l not in imp]
        if imp and any(l.strip() and not l.startswith('#|') for l in rest):
            directives = [l for l in rest if l.startswith('#|')]
            rest = [l for l in rest if not l.startswith('#|')]
            out.append(head + '\n' + '\n'.join(directives + imp) + '\n\n')
            out.append(head + '\n' + '\n'.join(directives + rest))
        else: out.append(c)
    return ''.join(out)

if __name__ == '__main__':
    for p in sys.argv[1:]: Path(p).write_text(split(Path(p).read_text()))
