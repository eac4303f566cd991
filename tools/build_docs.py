"""Build the offline docs site in _docs/ from the notebooks: one command, no Quarto, no network.

    python tools/build_docs.py              # -> _docs/index.html and one page per notebook (`make docs`)
    python tools/build_docs.py --out DIR    # build somewhere else (the tests build into a temp dir)

1. nbdev's doc processors (`nbdev.serve.proc_nbs`: what `nbdev-docs` runs before Quarto) write processed
   notebooks to _proc/: hidden cells dropped, directives stripped, `show_doc` of every exported name
   inserted and executed. (`nbdev-proc-nbs` itself insists on installing Quarto, so it is not used.)
2. `stage_nb` turns each into what MkDocs + mkdocs-jupyter render with the stored outputs: the front
   matter becomes `# Title` + `> summary`; `#| output: asis` cells (show_doc's API docs) become markdown
   cells, so they are in the page's table of contents; Quarto's `#| echo: false`, `#| output: false`,
   `#| include: false` become cell tags or a dropped cell; plotly figures become HTML drawn by the local
   plotly.js, widgets a note; links to the published docs become relative links. Pages are named by nbdev's `output-file` (00_config.ipynb ->
   config.html), as on the Quarto site, so nbdev's doc links work on both.
3. MkDocs (Material theme, offline plugin, `--strict`) builds into a temp dir that then replaces the
   output dir. The build fails (exit 1) when MkDocs warns, a page is missing, or a page would load a
   script or stylesheet from the network. plotly.js and MathJax are copied from their Python packages.

nbdev's own Quarto configuration (nbs/_quarto.yml, nbs/nbdev.yml) is refreshed too, so `nbdev-docs`
keeps working for anyone who has Quarto."""
import argparse, hashlib, html.parser, json, os, re, shutil, subprocess, sys, tempfile
from pathlib import Path

# runs/ under nbs/ holds what notebooks wrote while executing (e.g. the README example's run): not docs
SKIP_FOLDERS = r'^([_.]|runs$)'

ROOT = Path(__file__).resolve().parents[1]
PLOTLY_MIME = 'application/vnd.plotly.v1+json'
WIDGET_MIME = 'application/vnd.jupyter.widget-view+json'
CELL_KEYS = {'cell_type', 'id', 'metadata', 'source', 'attachments', 'outputs', 'execution_count'}
NOT_COPIED = {'.yml', '.yaml', '.css', '.qmd', '.md', '.py', '.ipynb'}  # Quarto config and sources: not site files

class DocsError(Exception): "The docs could not be built; the message says which file and why."

IMPORT_HINT = ("nbdev's doc processor runs every exported cell and every cell that contains an import "
               "statement (to render the API docs); a cell that mixes imports with code using non-exported "
               "names fails there: put the imports in a cell of their own")

def process_notebooks(force:bool=False) -> Path:
    "Run nbdev's doc processors over each notebook in nbs/ into _proc/ (changed ones only unless `force`)."
    os.chdir(ROOT)
    from nbdev.config import get_config
    from nbdev.doclinks import _build_modidx
    from nbdev.quarto import refresh_quarto_yml
    from nbdev.serve import proc_nbs
    cfg = get_config()
    refresh_quarto_yml()   # nbdev-docs' Quarto config, kept current with pyproject.toml
    _build_modidx()        # doc links of exported names
    if force: shutil.rmtree(cfg.config_path/'_proc', ignore_errors=True)
    errors, nbs = [], notebooks(cfg.nbs_path)
    if not nbs: raise DocsError(f"no notebooks in {cfg.nbs_path}")
    for nb in nbs:  # one at a time, so that every failing notebook is reported
        try: proc = Path(proc_nbs(str(cfg.nbs_path), n_workers=0, file_glob=nb.name, skip_folder_re=SKIP_FOLDERS))
        except Exception as e: errors.append(f"nbs/{nb}: {e}")
    if errors: raise DocsError("nbdev's doc processors failed:\n" + "\n\n".join(errors) + f"\n({IMPORT_HINT})")
    return proc

def notebooks(nbs:Path) -> list[Path]:
    "The notebooks under `nbs` that become pages, relative to it (nbdev skips names starting with `_` or `.`)."
    return sorted(p.relative_to(nbs) for p in nbs.rglob('*.ipynb') if not any(q.startswith(('.', '_')) for q in p.relative_to(nbs).parts))

_FM = re.compile(r'^\s*---\s*\n(.*?)\n---\s*$', re.S)

def front_matter(nb) -> dict:
    "The YAML front matter nbdev's FrontmatterProc put in the notebook's raw cell ({} if there is none)."
    import yaml
    for c in nb.cells:
        m = _FM.match(c.source) if c.cell_type == 'raw' else None
        if m: return yaml.safe_load(m.group(1)) or {}
    return {}

def front_matter_md(fm:dict) -> str:
    "The front matter as it reads in the notebook: `# Title` and a `> summary` line."
    if not fm.get('title'): return ''
    return f"# {fm['title']}" + (f"\n\n> {fm['description']}" if fm.get('description') else '')

_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')

def split_directives(source:str) -> tuple[dict, str]:
    "The `#| key: value` lines opening a code cell, as a dict, and the source without them."
    lines, d = source.splitlines(), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        d[m.group(1)] = m.group(2).lower() if m.group(2).lower() in ('true', 'false') else m.group(2)
        lines.pop(0)
    return d, '\n'.join(lines)

def plotly_html(fig:dict) -> str:
    "A plotly figure (the `application/vnd.plotly.v1+json` output) as HTML that draws it with the page's plotly.js."
    import plotly.io as pio
    div_id = 'plotly-' + hashlib.sha1(json.dumps(fig, sort_keys=True).encode()).hexdigest()[:12]  # stable pages
    html = pio.to_html(fig, include_plotlyjs=False, full_html=False, validate=False, div_id=div_id)
    scripts = re.findall(r'<script[^>]*>', html)
    if len(scripts) != 1: raise DocsError(f"plotly.io.to_html gave {len(scripts)} <script> tags, expected 1: update plotly_html")
    # plotly.js is loaded at the end of the page (extra_javascript): draw once the page has loaded
    return html.replace(scripts[0], scripts[0] + 'window.addEventListener("load", function () {').replace('</script>', '});</script>')

_PANDOC_LINK = re.compile(r'\[([^\]]+)\]\(([^)\s]+)\)\{([^}]*)\}')

def pandoc_links(md:str) -> str:
    "Pandoc's `[text](url){target=... style=...}` (nbdev's show_doc source links) as HTML links, which any markdown renders."
    from html import escape
    def a(m):
        attrs = ''.join(f' {k}="{escape(v)}"' for k, v in re.findall(r'([\w-]+)="([^"]*)"', m.group(3)))
        return f'<a href="{escape(m.group(2))}"{attrs}>{m.group(1)}</a>'
    return _PANDOC_LINK.sub(a, md)

def widget_html(text:str) -> str:
    "What a static page shows instead of a live widget: its repr and where to use it."
    from html import escape
    return (f'<div class="cream-widget"><code>{escape(text)}</code><br>'
            '<em>An interactive widget: run this notebook in JupyterLab to use it.</em></div>')

def static_outputs(outputs:list) -> list:
    "Outputs a static page can show: plotly figures as HTML, widgets as a note, the rest unchanged."
    for o in outputs:
        data = o.get('data', {})
        if PLOTLY_MIME in data:
            data['text/html'] = plotly_html(data.pop(PLOTLY_MIME))
        elif WIDGET_MIME in data:
            data.pop(WIDGET_MIME)
            text = data.get('text/plain', 'widget')
            data['text/html'] = widget_html(''.join(text) if isinstance(text, list) else text)
    return outputs

def stage_nb(nb, depth:int, docs_url:str):
    "Turn an nbdev-processed notebook into what mkdocs-jupyter renders (see the module docstring)."
    import nbformat
    fm, cells = front_matter(nb), []
    for c in nb.cells:
        if c.cell_type == 'raw' and _FM.match(c.source):
            if fm.get('title'): c.cell_type, c.source = 'markdown', front_matter_md(fm)
            else: continue
        if c.cell_type == 'code':
            d, c.source = split_directives(c.source)
            if d.get('include') == 'false': continue
            if d.get('output') == 'asis':  # markdown to be read as part of the page (show_doc): a markdown cell
                md = ''.join(''.join(o['data']['text/markdown']) for o in c.get('outputs', []) if 'text/markdown' in o.get('data', {}))
                if d.get('echo') != 'false': c.outputs = []; cells.append(c)
                if md.strip(): cells.append(nbformat.v4.new_markdown_cell(pandoc_links(md), id=f"{c.get('id', 'cell')}-asis"))
                continue
            tags = set(c.metadata.get('tags', []))
            if d.get('echo') == 'false': tags.add('remove_input')
            if d.get('output') == 'false': tags.add('remove_output')
            tags.discard('skip-execution')  # only for running the notebook; the page need not show it
            if tags: c.metadata['tags'] = sorted(tags)
            else: c.metadata.pop('tags', None)
            static_outputs(c.get('outputs', []))
        elif c.cell_type == 'markdown': c.source = pandoc_links(c.source)
        for k in set(c) - CELL_KEYS: del c[k]  # nbdev's bookkeeping (`has_sd`) is not nbformat
        c.metadata.pop('execution', None)       # timings, some in a shape nbformat refuses
        cells.append(c)
    nb.cells = cells
    nb.metadata.pop('widgets', None)  # no widget manager offline (nbconvert would load one from a CDN)
    text = json.dumps(nb)             # links to the published docs -> relative links within this site
    if docs_url: nb = nbformat.from_dict(json.loads(text.replace(docs_url.rstrip('/') + '/', '../' * depth or './')))
    return nb

def page_path(src:Path, fm:dict) -> Path:
    "Where a notebook's page lies in the site (relative): nbdev's `output-file` beside the notebook's folder."
    name = Path(fm.get('output-file') or src.with_suffix('.html').name)
    return src.parent/name.with_suffix('.ipynb')

def stage(proc:Path, nbs:Path, docs:Path, docs_url:str) -> list[dict]:
    "Write the site's sources from _proc/ into `docs`; return one {src, page, title} per notebook."
    import nbformat
    pages = []
    for src in notebooks(nbs):
        f = proc/src
        if not f.exists(): raise DocsError(f"{f}: nbdev's processors wrote no processed copy of nbs/{src}")
        nb = nbformat.read(f, as_version=4)
        fm = front_matter(nb)
        if not fm.get('title'): raise DocsError(f"nbs/{src}: no title: the notebook must open with a `# Title` markdown cell")
        page = page_path(src, fm)
        if any(p['page'] == page for p in pages): raise DocsError(f"nbs/{src}: page {page} already comes from another notebook")
        (docs/page).parent.mkdir(parents=True, exist_ok=True)
        nb = stage_nb(nb, len(src.parts) - 1, docs_url)
        try: nbformat.validate(nb)
        except nbformat.ValidationError as e: raise DocsError(f"nbs/{src}: the staged notebook is not valid nbformat: {e}")
        nbformat.write(nb, docs/page)
        pages.append(dict(src=src, page=page, title=fm['title']))
    for f in proc.rglob('*'):  # images and data the notebooks show
        rel = f.relative_to(proc)
        if f.is_file() and f.suffix not in NOT_COPIED and not any(p.startswith('.') for p in rel.parts):
            (docs/rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, docs/rel)
    return pages

def section_title(folder:str) -> str: return folder.replace('_', ' ').strip().capitalize()

LAYER = re.compile(r'^\d+_([a-z]+)\.[a-z_]+\.ipynb$')   # 22_models.engine.ipynb: a notebook of the `models` layer (DEVELOPING.md)

def nav(pages:list[dict], folder:tuple=()) -> list:
    "MkDocs nav: index first, then the notebooks in file (numbered) order, each layer and each sub-folder a section."
    here = sorted((p for p in pages if p['src'].parts[:-1] == folder), key=lambda p: (p['src'].name != 'index.ipynb', p['src'].name))
    out, sections = [], {}
    for p in here:
        item = {'Overview' if p['src'] == Path('index.ipynb') else p['title']: p['page'].as_posix()}
        if (m := LAYER.match(p['src'].name)):
            if m[1] not in sections: sections[m[1]] = []; out.append({section_title(m[1]): sections[m[1]]})
            sections[m[1]].append(item)
        else: out.append(item)
    subs = sorted({p['src'].parts[len(folder)] for p in pages if len(p['src'].parts) > len(folder) + 1 and p['src'].parts[:len(folder)] == folder})
    return out + [{section_title(s): nav(pages, folder + (s,))} for s in subs]

class _Assets(html.parser.HTMLParser):
    "Collects the URLs a page loads to lay itself out: scripts, stylesheets, preloads, icons."
    def __init__(self): super().__init__(); self.urls = []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == 'script' and a.get('src'): self.urls.append(a['src'])
        if tag == 'link' and a.get('href') and set((a.get('rel') or '').split()) & {'stylesheet', 'preload', 'modulepreload', 'icon'}:
            self.urls.append(a['href'])

def external_assets(site:Path) -> dict:
    "{page: [url, ...]} for every page of `site` that loads a script or stylesheet from the network."
    bad = {}
    for f in sorted(site.rglob('*.html')):
        p = _Assets(); p.feed(f.read_text(encoding='utf-8'))
        urls = [u for u in p.urls if re.match(r'^(https?:)?//', u)]
        if urls: bad[str(f.relative_to(site))] = urls
    return bad

def copy_assets(docs:Path):
    "The site's own scripts and styles: tools/docs_assets/, plotly.js (plotly) and MathJax 2 (jupyter-server-mathjax)."
    import plotly, jupyter_server_mathjax
    shutil.copytree(ROOT/'tools'/'docs_assets', docs/'assets', dirs_exist_ok=True)
    shutil.copy2(Path(plotly.__file__).parent/'package_data'/'plotly.min.js', docs/'assets'/'plotly.min.js')
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent/'static', docs/'assets'/'mathjax',
                    ignore=shutil.ignore_patterns('localization', 'SVG'))  # HTML-CSS output only: 7 of its 12 MB

def mkdocs_build(docs:Path, site:Path, pages:list[dict], work:Path):
    "Run MkDocs --strict over the staged `docs` into `site`, with a config inheriting the repo's mkdocs.yml."
    import yaml
    cfg = dict(INHERIT=str(ROOT/'mkdocs.yml'), docs_dir=str(docs), site_dir=str(site), nav=nav(pages))
    (work/'mkdocs.yml').write_text(yaml.safe_dump(cfg, sort_keys=False))
    r = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--clean', '-f', str(work/'mkdocs.yml')],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode: raise DocsError(f"mkdocs build --strict failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")

def build(out:Path|None=None, force:bool=False) -> Path:
    "Build the whole site into `out` (default: nbdev's doc_path, _docs/), replacing what was there."
    from nbdev.config import get_config
    cfg = get_config(str(ROOT))
    out = Path(out or cfg.doc_path).absolute()
    proc = process_notebooks(force)
    docs_url = f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}"
    with tempfile.TemporaryDirectory(prefix='cream-docs-') as tmp:
        tmp = Path(tmp); docs, site = tmp/'docs', tmp/'site'
        pages = stage(proc, cfg.nbs_path, docs, docs_url)
        copy_assets(docs)
        mkdocs_build(docs, site, pages, tmp)
        missing = [str(p['page'].with_suffix('.html')) for p in pages if not (site/p['page'].with_suffix('.html')).exists()]
        if missing: raise DocsError(f"pages missing from the built site: {missing}")
        if bad := external_assets(site): raise DocsError(f"pages load scripts/styles from the network (the site must work offline): {bad}")
        out.parent.mkdir(parents=True, exist_ok=True)
        old = out.with_name(out.name + '.old')
        shutil.rmtree(old, ignore_errors=True)
        if out.exists(): out.rename(old)
        shutil.move(str(site), str(out))  # a new _docs/ appears whole or not at all
        shutil.rmtree(old, ignore_errors=True)
    print(f"docs: {len(pages)} pages -> {out}/index.html")
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', type=Path, help="output folder (default: _docs/)")
    ap.add_argument('--force', action='store_true', help="re-process every notebook, ignoring _proc/'s cache")
    a = ap.parse_args()
    try: build(a.out, a.force)
    except DocsError as e: sys.exit(f"docs build failed: {e}")

if __name__ == '__main__': main()
