"""Write README.md from nbs/index.ipynb without Quarto.

nbdev's own processors (the ones `nbdev-docs` uses: hidden cells dropped, directives stripped,
show_doc rendered) turn the notebook into a processed copy under _proc/, and nbconvert turns that
into GitHub markdown. `python tools/make_readme.py --check` fails when README.md is out of date."""
import sys, os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "<!-- Generated from nbs/index.ipynb by `make readme`: edit the notebook, not this file. -->\n\n"

def render() -> str:
    os.chdir(ROOT)
    from nbdev.serve import proc_nbs
    from nbconvert import MarkdownExporter
    import nbformat
    cache = proc_nbs('nbs', n_workers=0, file_glob='index.ipynb')
    nb = nbformat.read(cache/'index.ipynb', as_version=4)
    # front matter cell (`# Title` + `> summary`) is kept as written; raw cells are Quarto-only
    nb.cells = [c for c in nb.cells if c.cell_type != 'raw']
    body, _ = MarkdownExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(nb)
    lines = [l.rstrip() for l in body.strip().splitlines()]
    out, blank = [], False
    for l in lines:  # collapse runs of blank lines
        if not l and blank: continue
        out.append(l); blank = not l
    return HEADER + "\n".join(out) + "\n"

def main():
    text = render()
    readme = ROOT/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date with nbs/index.ipynb: run `make readme` and commit it.")
            sys.exit(1)
        return
    if not readme.exists() or readme.read_text() != text:
        tmp = readme.with_suffix('.md.tmp'); tmp.write_text(text); tmp.replace(readme)
        print("README.md written")

if __name__ == '__main__': main()
