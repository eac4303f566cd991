"""The offline docs site (tools/build_docs.py, `make docs`) and the README (tools/make_readme.py).

The whole site is built once, from the real notebooks, into a temp dir, the way `make docs` runs it.
The staging steps (front matter, Quarto directives, plotly, widgets, links, nav) are also tested one by one
on small notebooks made here, and a small site with a plotly figure and math is opened in headless Chromium."""
import html, json, re, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output, new_raw_cell

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import build_docs as bd
import make_readme

NBS = ROOT/'nbs'
CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'

def text_of(page:Path) -> str:
    "A page's visible text, roughly: tags dropped, entities decoded (code is split into highlight spans)."
    s = re.sub(r'<(script|style)\b.*?</\1>', ' ', page.read_text(encoding='utf-8'), flags=re.S)
    return html.unescape(re.sub(r'<[^>]+>', '', s))

def expected_page(src:Path) -> Path:
    "The page nbdev's Quarto site gives a notebook: its folder + the name without the number prefix."
    from nbdev.config import nbpath2html
    return nbpath2html(src)

@pytest.fixture(scope='module')
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('docs')/'_docs'
    r = subprocess.run([sys.executable, str(ROOT/'tools/build_docs.py'), '--out', str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"docs build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out

# ---------------------------------------------------------------- the real site

@pytest.mark.slow
def test_index_and_one_page_per_notebook(site):
    nbs = bd.notebooks(NBS)
    assert Path('index.ipynb') in nbs and Path('00_core.config.ipynb') in nbs
    for src in nbs:
        page = site/expected_page(src)
        assert page.is_file(), f"no page {page.name} for nbs/{src}"
        title = nbformat.read(NBS/src, as_version=4).cells[0].source.splitlines()[0].lstrip('# ').strip()
        s = page.read_text(encoding='utf-8')
        assert re.search(rf'<h1[^>]*>\s*{re.escape(html.escape(title, quote=False))}', s), f"{page.name}: no heading {title!r}"
        if src != Path('index.ipynb'): assert f'<title>{html.escape(title, quote=False)} - cream_nb</title>' in s

@pytest.mark.slow
def test_nav_links_every_page_in_notebook_order(site):
    s = (site/'core.config.html').read_text(encoding='utf-8')
    links = list(dict.fromkeys(re.findall(r'<a href="([^"#]+\.html)" class="md-nav__link', s)))
    order = sorted(bd.notebooks(NBS), key=lambda p: (len(p.parts) > 1, p.name != 'index.ipynb', str(p)))
    assert links == [str(expected_page(p)) for p in order]
    assert re.search(r'<a href="index.html" class="md-nav__link">\s*<span class="md-ellipsis">\s*Overview\s*<', s)

@pytest.mark.slow
def test_config_page_shows_api_docs_and_outputs(site):
    from cream_nb.core.config import CreamConfig, preset, apply_overrides, describe
    page = (site/'core.config.html').read_text(encoding='utf-8')
    text = text_of(site/'core.config.html')
    for f in (preset, CreamConfig, apply_overrides, describe):  # show_doc: heading with an anchor, signature, docstring
        assert f'id="{f.__name__.lower()}"' in page, f.__name__
        assert f.__doc__.replace('`', '') in text, f.__name__
    assert "def preset(" in text and "def apply_overrides(" in text
    # a real cell output: describe(preset('tiny')), printed
    assert "model.name = 'tiny'  # M0: 'embedded'" in text
    assert "lines = describe(preset('tiny')).splitlines()" in text  # a shown cell's source is found by this check...
    assert "from fastcore.test import" not in text    # ...and the hidden cell's is not there
    assert "show_doc(" not in text and '#|' not in text

@pytest.mark.slow
def test_hidden_cells_absent_everywhere(site):
    for src in bd.notebooks(NBS):
        text = text_of(site/expected_page(src))
        for c in nbformat.read(NBS/src, as_version=4).cells:
            d, code = bd.split_directives(c.source) if c.cell_type == 'code' else ({}, '')
            if 'hide' in d or d.get('include') == 'false':
                for line in (l for l in code.splitlines() if len(l.strip()) > 12):
                    assert line.strip() not in text, f"nbs/{src}: hidden source shown: {line!r}"

@pytest.mark.slow
def test_site_is_offline(site):
    assert bd.external_assets(site) == {}
    for f in site.rglob('*.html'):
        assert not re.search(r'<(script|link)[^>]+(src|href)="(https?:)?//', f.read_text(encoding='utf-8')), f
    for a in ('assets/plotly.min.js', 'assets/mathjax/MathJax.js', 'assets/iframe-worker-shim.js', 'search/search_index.js'):
        assert (site/a).is_file(), a
    assert (site/'core.config.html').read_text().count('assets/mathjax/MathJax.js') == 1

def test_quarto_config_kept_for_nbdev_docs():
    q, n = (NBS/'_quarto.yml').read_text(), (NBS/'nbdev.yml').read_text()
    assert 'metadata-files: [nbdev.yml, sidebar.yml]' in q and 'css: styles.css' in q
    assert (NBS/'styles.css').is_file()
    assert 'output-dir: _docs' in n and 'title: "cream_nb"' in n
    assert not (ROOT/'settings.ini').exists(), "nbdev 3 refuses to run beside a settings.ini"

# ---------------------------------------------------------------- staging, piece by piece

DOCS_URL = 'https://cream-nb.github.io/cream_nb'

def processed_nb() -> nbformat.NotebookNode:
    "A notebook as nbdev's processors leave it, with one of each thing staging must handle."
    import plotly.graph_objects as go
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2])).to_plotly_json()
    return new_notebook(cells=[
        new_raw_cell("---\ndescription: One line.\noutput-file: demo.html\ntitle: Demo\n---\n"),
        new_markdown_cell(f"See [`preset`]({DOCS_URL}/config.html#preset)."),
        new_code_cell("#| echo: false\n#| output: asis\nshow_doc(f)", outputs=[new_output(
            'execute_result', {'text/markdown': '---\n\n[source](https://x.invalid/f.py#L1){target="_blank" style="float:right"}\n\n### f\n\n*Doc.*',
                               'text/plain': 'f'}, execution_count=1)]),
        new_code_cell("#| echo: false\nprint(1)", outputs=[new_output('stream', name='stdout', text='1\n')]),
        new_code_cell("#| include: false\nsecret = 1"),
        new_code_cell("#| output: false\nx = 2\nx", outputs=[new_output('execute_result', {'text/plain': '2'}, execution_count=2)]),
        new_code_cell("fig", outputs=[new_output('display_data', {bd.PLOTLY_MIME: fig})]),
        new_code_cell("w", outputs=[new_output('execute_result', {bd.WIDGET_MIME: {'model_id': 'abc', 'version_major': 2, 'version_minor': 0},
                                                                 'text/plain': 'IntSlider(value=3)'}, execution_count=3)]),
    ], metadata={'widgets': {'application/vnd.jupyter.widget-state+json': {'state': {}}}})

def test_split_directives():
    test = bd.split_directives("#| echo: false\n#|hide\n#| output: asis\nx = 1  #| not a directive\ny")
    assert test == ({'echo': 'false', 'hide': '', 'output': 'asis'}, "x = 1  #| not a directive\ny")
    assert bd.split_directives("x\n#| echo: false") == ({}, "x\n#| echo: false")

def test_front_matter_back_to_markdown():
    nb = processed_nb()
    assert bd.front_matter(nb) == {'description': 'One line.', 'output-file': 'demo.html', 'title': 'Demo'}
    assert bd.front_matter_md(bd.front_matter(nb)) == "# Demo\n\n> One line."
    assert bd.front_matter_md({'title': 'T'}) == "# T"
    assert bd.page_path(Path('tutorials/01_walk.ipynb'), {'output-file': 'walk.html'}) == Path('tutorials/walk.ipynb')

def test_pandoc_links():
    md = 'a [source](https://x.invalid/f.py#L1){target="_blank" style="float:right; font-size:smaller"} b [plain](u)'
    assert bd.pandoc_links(md) == ('a <a href="https://x.invalid/f.py#L1" target="_blank" '
                                   'style="float:right; font-size:smaller">source</a> b [plain](u)')

def test_stage_nb():
    nb = bd.stage_nb(processed_nb(), depth=1, docs_url=DOCS_URL)
    nbformat.validate(nb)
    c = nb.cells
    assert [x.cell_type for x in c] == ['markdown', 'markdown', 'markdown', 'code', 'code', 'code', 'code']
    assert c[0].source == "# Demo\n\n> One line."
    assert c[1].source == "See [`preset`](../config.html#preset)."          # published docs -> relative link
    assert c[2].source.startswith('---\n\n<a href="https://x.invalid/f.py#L1" target="_blank"') and '### f' in c[2].source
    assert (c[3].source, c[3].metadata.tags) == ("print(1)", ['remove_input'])  # echo: false
    assert all('secret' not in x.source for x in c)                         # include: false
    assert (c[4].source, c[4].metadata.tags) == ("x = 2\nx", ['remove_output'])
    plot = c[5].outputs[0].data
    assert bd.PLOTLY_MIME not in plot and 'Plotly.newPlot' in plot['text/html']
    assert 'window.addEventListener("load"' in plot['text/html'] and '"y":[3,1,2]' in plot['text/html']
    w = c[6].outputs[0].data
    assert bd.WIDGET_MIME not in w and 'IntSlider(value=3)' in w['text/html'] and 'JupyterLab' in w['text/html']
    assert 'widgets' not in nb.metadata
    assert bd.stage_nb(processed_nb(), 0, DOCS_URL).cells[1].source == "See [`preset`](./config.html#preset)."

def test_plotly_html_is_stable():
    fig = {'data': [{'type': 'bar', 'x': ['a'], 'y': [1]}], 'layout': {}}
    assert bd.plotly_html(fig) == bd.plotly_html(json.loads(json.dumps(fig)))

def test_nav_orders_notebooks_and_makes_layer_and_folder_sections():
    P = lambda src, page, title: dict(src=Path(src), page=Path(page), title=title)
    pages = [P('50_runs.stage.ipynb', 'runs.stage.ipynb', 'Stages'), P('tutorials/02_b.ipynb', 'tutorials/b.ipynb', 'B'),
             P('01_core.artifacts.ipynb', 'core.artifacts.ipynb', 'Artifacts'), P('index.ipynb', 'index.ipynb', 'cream_nb'),
             P('tutorials/01_a.ipynb', 'tutorials/a.ipynb', 'A'), P('00_core.config.ipynb', 'core.config.ipynb', 'Configuration'),
             P('70_cli.ipynb', 'cli.ipynb', 'The cream command')]
    assert bd.nav(pages) == [{'Overview': 'index.ipynb'},
                             {'Core': [{'Configuration': 'core.config.ipynb'}, {'Artifacts': 'core.artifacts.ipynb'}]},
                             {'Runs': [{'Stages': 'runs.stage.ipynb'}]}, {'The cream command': 'cli.ipynb'},
                             {'Tutorials': [{'A': 'tutorials/a.ipynb'}, {'B': 'tutorials/b.ipynb'}]}]

def test_external_assets_found(tmp_path):
    (tmp_path/'a.html').write_text('<script src="https://cdn.invalid/x.js"></script><link rel="stylesheet" href="//cdn.invalid/y.css">'
                                   '<script src="assets/ok.js"></script><a href="https://example.invalid">a link is fine</a>')
    assert bd.external_assets(tmp_path) == {'a.html': ['https://cdn.invalid/x.js', '//cdn.invalid/y.css']}

def test_broken_notebook_fails_the_build_loudly(tmp_path):
    nbs, proc = tmp_path/'nbs', tmp_path/'_proc'
    nbs.mkdir(); proc.mkdir()
    nbformat.write(new_notebook(cells=[new_markdown_cell("no title here")]), nbs/'01_x.ipynb')
    with pytest.raises(bd.DocsError, match="nbdev's processors wrote no processed copy of nbs/01_x.ipynb"):
        bd.stage(proc, nbs, tmp_path/'docs', DOCS_URL)
    nbformat.write(new_notebook(cells=[new_markdown_cell("no title here")]), proc/'01_x.ipynb')
    with pytest.raises(bd.DocsError, match=r"nbs/01_x.ipynb: no title"):
        bd.stage(proc, nbs, tmp_path/'docs', DOCS_URL)

# ---------------------------------------------------------------- a small site in a browser

@pytest.fixture(scope='module')
def small_site(tmp_path_factory) -> Path:
    "A site built by the same staging + MkDocs steps from one processed notebook with a figure and math."
    tmp = tmp_path_factory.mktemp('small')
    nbs, proc = tmp/'nbs', tmp/'_proc'
    (nbs/'tutorials').mkdir(parents=True); (proc/'tutorials').mkdir(parents=True)
    nb = processed_nb()
    nb.cells.insert(2, new_markdown_cell(r"The rate is $c_x = (\tau(J, K) + 1) / 2$."))
    for d in (nbs, proc): nbformat.write(nb, d/'tutorials'/'01_demo.ipynb')
    index = new_notebook(cells=[new_raw_cell("---\ntitle: Home\noutput-file: index.html\n---\n"), new_markdown_cell("Hello.")])
    for d in (nbs, proc): nbformat.write(index, d/'index.ipynb')
    pages = bd.stage(proc, nbs, tmp/'docs', DOCS_URL)
    bd.copy_assets(tmp/'docs')
    bd.mkdocs_build(tmp/'docs', tmp/'site', pages, tmp)
    assert bd.external_assets(tmp/'site') == {}
    return tmp/'site'

@pytest.mark.slow
@pytest.mark.browser
def test_plotly_and_math_render_offline_in_chromium(small_site):
    if not Path(CHROMIUM).exists(): pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=['--no-sandbox', '--disable-gpu'])
        pg = b.new_page()
        requests, errors = [], []
        pg.on('request', lambda r: requests.append(r.url))
        pg.on('pageerror', lambda e: errors.append(str(e)))
        pg.goto((small_site/'tutorials'/'demo.html').as_uri()); pg.wait_for_load_state('load')
        pg.wait_for_selector('.js-plotly-plot .main-svg', timeout=15000)   # plotly.js drew the figure
        pg.wait_for_selector('.MathJax', timeout=15000)                     # MathJax typeset $c_x ...$
        assert pg.locator('.js-plotly-plot').count() == 1
        assert pg.evaluate("document.querySelector('nav.md-nav--primary').innerText").count('Demo') >= 1
        assert 'An interactive widget' in pg.inner_text('body')
        b.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(('file:', 'data:', 'blob:', 'about:'))] == []

# ---------------------------------------------------------------- the README

def test_readme_nb_from_processed_index():
    nb = new_notebook(cells=[
        new_raw_cell("---\ndescription: Sum.\ntitle: cream_nb\n---\n"),
        new_markdown_cell(make_readme.NBDEV_WARNING),
        new_code_cell("#| eval: false\nrun()"),
    ])
    test = make_readme.readme_nb(nb)
    assert [c.source for c in test.cells] == ["# cream_nb\n\n> Sum.", "run()"]
    assert test.metadata.language_info == {'name': 'python'}

@pytest.mark.slow
def test_readme_rendered_from_index():
    text = make_readme.render()
    assert text == make_readme.render()  # deterministic: CI compares it byte for byte
    index = nbformat.read(NBS/'index.ipynb', as_version=4)
    title, summary = index.cells[0].source.splitlines()[:2]
    assert text.startswith(make_readme.HEADER + title + "\n\n" + summary + "\n")
    assert '#|' not in text and 'WARNING: THIS FILE WAS AUTOGENERATED' not in text
    assert "```python\nfrom cream_nb.core.config import preset, apply_overrides" in text
    assert "```\n('tiny', 0.2, 'dyn', 4)\n```" in text  # the example's real output
    assert 'nbdev 3 refuses to run beside one' in text and 'nbdev 2 no longer imports' in text
    assert "make run" in text and "make test" in text

# ---------------------------------------------------------------- the committed comparison results and their page

def test_committed_comparison_results_load():
    "Every data/compare/*.json (tools/publish_compare.py) holds the tables, the command and the commit that made them."
    from cream_nb.reporting.tables import compare_text
    files = sorted((ROOT/'data'/'compare').glob('*.json'))
    assert ROOT/'data'/'compare'/'cpu-demo.json' in files, "no committed cpu-demo comparison: run `make run` and tools/publish_compare.py"
    for f in files:
        r = json.loads(f.read_text())
        assert f.stem == r['preset'] or f.stem.startswith(r['preset'] + '-'), f"{f.name} holds a {r['preset']!r} comparison: name the file after its preset"
        assert re.fullmatch(r'[0-9a-f]{40}', r['commit']) and r['command'] and r['wall_seconds'] > 0
        tab = r['tables']
        assert tab['methods'] and 'm1' in tab['accuracy'][tab['methods'][0]], f.name
        for m, models in tab['accuracy'].items():
            for k, cells in models.items():
                for t, c in cells.items(): assert c['low'] - 1e-12 <= c['accuracy'] <= c['high'] + 1e-12 or t == 'average', (f.name, m, k, t)
        text = compare_text(tab)
        assert 'Accuracy, ' in text and 'Paired tests' in text and 'kendall' in text
        assert f.stat().st_size < 200_000, f"{f.name} is {f.stat().st_size} bytes: keep committed results small"

@pytest.mark.slow
def test_comparison_page_renders(site):
    page = site/'tutorials'/'comparison.html'
    s, text = page.read_text(encoding='utf-8'), text_of(page)
    assert s.count('Plotly.newPlot') >= 2                         # accuracy per task and consistency, drawn statically
    for h in ('Table 1: accuracy per task, with 95% intervals', 'Paired tests', 'Where the time went'):
        assert h in text, h
    assert 'Accuracy, % [95% Wilson interval]' in text and 'McNemar' in text


@pytest.mark.slow
def test_methods_page_renders(site):
    "The page of every registered method: a section per method, the committed comparison's tables and one prompt's pairs."
    page = site/'tutorials'/'methods.html'
    text = text_of(page)
    for h in ('The methods', 'One prompt, every method', 'Reading it', 'ScPO', 'Meta-Rewarding', 'Temporal', 'Paired tests', 'kendall'):
        assert h in text, h
    r = json.loads((ROOT/'data'/'compare'/'cpu-demo-methods.json').read_text())
    from cream_nb.methods.registry import method_names   # the committed comparison holds every registered method ('cream' as cream-avg/-dyn)
    assert {n for n in method_names() if n != 'cream'} <= set(r['tables']['methods']), r['tables']['methods']
    for m, v in r['example']['methods'].items():
        assert m in text and (v['pair'] is None or v['pair']['chosen'].split('\n')[0][:40] in text), m
