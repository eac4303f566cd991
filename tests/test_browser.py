"""Browser tests: the tutorial run in JupyterLab, and the inspector/tutorial docs pages, in headless Chromium.

Debian's chromium (/usr/bin/chromium) is driven by Playwright's Python package (Playwright cannot download
its own browser here). Screenshots go to test-artifacts/ (git-ignored) for a person to look at."""
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path('/usr/bin/chromium')
TUTORIAL = 'nbs/tutorials/01_walkthrough.ipynb'
ARTIFACTS = ROOT/'test-artifacts'
RUN_ALL_TIMEOUT_S = 600   # the tutorial makes a 2-iteration tiny run: 2-4 minutes on a busy 2-core machine

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def chromium() -> str:
    "Path of Debian's chromium; fails (never skips) when it is missing."
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium (sudo apt-get install -y chromium)")
    return str(CHROMIUM)

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def wait_until(cond, timeout:float, what:str, every:float=0.5):
    "Poll `cond()` until it returns something truthy; fail with `what` after `timeout` seconds."
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = cond()
        if got: return got
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")

# ---------------------------------------------------------------- JupyterLab

@pytest.fixture
def jupyterlab(tmp_path):
    "A JupyterLab server on 127.0.0.1 (free port, token, fresh settings), serving the repository; (url, token)."
    port, token = free_port(), secrets.token_hex(16)
    settings = tmp_path/'lab-settings'/'@jupyterlab'
    for d in ('notebook-extension', 'docmanager-extension', 'apputils-extension'): (settings/d).mkdir(parents=True)
    # every cell in the DOM (no virtual scrolling), so widgets and plots below the fold render and can be checked
    (settings/'notebook-extension'/'tracker.jupyterlab-settings').write_text(json.dumps({'windowingMode': 'none'}))
    # never write the browser's outputs into the repository's notebook
    (settings/'docmanager-extension'/'plugin.jupyterlab-settings').write_text(json.dumps({'autosave': False}))
    # no "get notified about Jupyter news?" toast over the figures (and no network call for it)
    (settings/'apputils-extension'/'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False, 'doNotDisturbMode': True}))
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path/'jupyter-config'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'jupyter-runtime'),
           'IPYTHONDIR': str(tmp_path/'ipython')}
    log = open(tmp_path/'jupyterlab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
                             '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={ROOT}',
                             f'--LabApp.user_settings_dir={tmp_path/"lab-settings"}', f'--LabApp.workspaces_dir={tmp_path/"lab-workspaces"}',
                             '--LabApp.expose_app_in_browser=True']   # window.jupyterapp: the tests drive the lab through its command API
                            + (['--allow-root'] if os.geteuid() == 0 else []),   # CI containers run as root
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    def up():
        if proc.poll() is not None: pytest.fail(f"JupyterLab exited ({proc.returncode}):\n{(tmp_path/'jupyterlab.log').read_text()[-3000:]}")
        try: return urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2).status == 200
        except OSError: return False
    try:
        wait_until(up, 90, 'JupyterLab to answer on /api/status')
        yield url, token
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)          # the server and the kernels it started (its own session)
            try: proc.wait(timeout=20)
            except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(timeout=10)
        log.close()

def browser(p, tmp_path):
    "Headless Chromium with a fresh user-data dir."
    return p.chromium.launch_persistent_context(str(tmp_path/'chromium-profile'), executable_path=chromium(), headless=True,
                                                args=['--no-sandbox', '--disable-gpu'], viewport={'width': 1400, 'height': 2000})

def cell_errors(page) -> list[str]:
    "Tracebacks shown in the notebook's outputs."
    return [t for t in page.locator('.jp-OutputArea-output').all_inner_texts() if 'Traceback (most recent call last)' in t]

STEP_TIMEOUT_S = 60       # any one step of driving the lab (a page to load, a command to take effect, a cell to start)

def lab(page, js:str, arg=None):
    "Evaluate `js` (a function of the JupyterLab app object and `arg`) in the page; the app is exposed by expose_app_in_browser."
    return page.evaluate(f"([arg]) => {{ const app = window.jupyterapp; return ({js})(app, arg); }}", [arg])

def lab_command(page, command:str):
    "Run a JupyterLab command through the app's command registry (no menu clicks to miss)."
    lab(page, "(app, c) => app.commands.execute(c)", command)

def kernel_status(page) -> str:
    "The notebook's kernel status as the app sees it: 'idle', 'busy', 'starting', ... ('' before a session exists)."
    return lab(page, "app => app.shell.currentWidget?.context?.sessionContext?.session?.kernel?.status ?? ''")

def execution_counts(page) -> list:
    "Each code cell's execution count in the notebook model (null: not run, or queued)."
    return lab(page, "app => Array.from(app.shell.currentWidget.content.model.cells).filter(c => c.type === 'code').map(c => c.executionCount)")

def run_all_cells(page):
    """Clear the stored outputs, run every cell through JupyterLab's command API, wait until the last code cell has run.
    Run All is confirmed to have started (a cell running or counted) and re-issued if not; a traceback fails at once;
    a kernel idle with cells left unrun fails within a minute."""
    n = sum(c['cell_type'] == 'code' for c in json.loads((ROOT/TUTORIAL).read_text())['cells'])
    wait_until(lambda: len(execution_counts(page)) == n, STEP_TIMEOUT_S, f'JupyterLab to load the {n} code cells of {TUTORIAL}')
    wait_until(lambda: kernel_status(page) == 'idle', 90, 'the kernel to start')
    # first drop the outputs stored in the file, so that every widget and plot checked below comes from this run
    lab_command(page, 'editmenu:clear-all')
    wait_until(lambda: page.locator('.jp-OutputArea-output').count() == 0 and not any(execution_counts(page)), STEP_TIMEOUT_S,
               'the stored outputs to be cleared')
    def started(): return kernel_status(page) == 'busy' or any(execution_counts(page))
    for attempt in range(3):
        lab_command(page, 'notebook:run-all-cells')
        t0 = time.time()
        while time.time() - t0 < 20 and not started(): time.sleep(0.5)
        if started(): break
        print(f"Run All did not start within 20 s (attempt {attempt + 1}); issuing it again")
    else: pytest.fail("Run All never started: the kernel stayed idle after three notebook:run-all-cells commands")
    idle_since = [None]
    def done():
        if errs := cell_errors(page): pytest.fail("a tutorial cell failed in JupyterLab:\n" + errs[0][-3000:])
        counts, status = execution_counts(page), kernel_status(page)
        if all(counts) and status == 'idle': return True
        if status == 'idle' and not page.locator('.jp-CodeCell .jp-InputPrompt', has_text='*').count():   # nothing running or queued
            idle_since[0] = idle_since[0] or time.time()
            if time.time() - idle_since[0] > STEP_TIMEOUT_S:
                pytest.fail(f"the kernel is idle but code cells {[i for i, c in enumerate(counts) if not c]} never ran")
        else: idle_since[0] = None
        return False
    wait_until(done, RUN_ALL_TIMEOUT_S, f'the {n} code cells of {TUTORIAL} to run', every=2)

def shown_prompt(inspector) -> str:
    return inspector.locator('.cream-prompt').first.get_attribute('data-prompt-id')

def test_tutorial_runs_in_jupyterlab_and_its_widgets_work(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright
    url, token = jupyterlab
    ARTIFACTS.mkdir(exist_ok=True)
    source = (ROOT/TUTORIAL).read_bytes()
    with sync_playwright() as p:
        ctx = browser(p, tmp_path)
        page = ctx.new_page()
        page.set_default_timeout(STEP_TIMEOUT_S * 1000)
        page.goto(f'{url}/lab/tree/{TUTORIAL}?token={token}&reset')
        page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=90_000)
        wait_until(lambda: lab(page, "app => !!app && app.shell.currentWidget?.content?.model?.cells?.length > 0"), STEP_TIMEOUT_S,
                   'the notebook to open in the lab')
        run_all_cells(page)
        page.screenshot(path=str(ARTIFACTS/'browser-tutorial-end.png'))
        # the prompt inspector: ipywidgets rendered by JupyterLab's widget manager
        inspector = page.locator('.cream-prompt-inspector').first
        inspector.scroll_into_view_if_needed()
        assert inspector.locator('.cream-response').count() == 4
        selects = inspector.locator('.widget-dropdown select')                # iteration, task, pair, prompt
        shown = lambda: [selects.nth(i).evaluate('e => e.selectedIndex < 0 ? "" : e.options[e.selectedIndex].text').replace('\xa0', ' ')
                         for i in range(selects.count())]                    # (ipywidgets writes spaces as no-break spaces)
        assert shown()[:3] == ['iteration 1', 'all tasks', 'any'], shown()     # no control left blank
        assert inspector.locator('.js-plotly-plot').count() == 1               # the rank-agreement FigureWidget
        inspector.locator('.js-plotly-plot .scatterlayer .trace').first.wait_for()
        inspector.screenshot(path=str(ARTIFACTS/'browser-inspector-before-next.png'))
        before = shown_prompt(inspector)
        assert shown()[3].split()[0] == before                                # the prompt list names the prompt drawn
        inspector.locator('button.cream-nav', has_text='next').click()
        wait_until(lambda: shown_prompt(inspector) != before, 30, 'the inspector to show another prompt after "next"')
        after = shown_prompt(inspector)
        assert after and after != before and shown()[3].split()[0] == after
        inspector.screenshot(path=str(ARTIFACTS/'browser-inspector-after-next.png'))
        # the dashboard: four FigureWidgets drawn by plotly's anywidget front end, with both iterations after refresh
        dash = page.locator('.cream-dashboard').first
        dash.scroll_into_view_if_needed()
        wait_until(lambda: dash.locator('.js-plotly-plot .main-svg').count() >= 4, 60, 'the dashboard figures to draw')
        hist = dash.locator('.js-plotly-plot').first
        wait_until(lambda: hist.locator('.barlayer .trace').count() == 2, 30, 'two histogram traces (iterations 1 and 2)')
        for i in range(4): dash.locator('.js-plotly-plot').nth(i).screenshot(path=str(ARTIFACTS/f'browser-dashboard-figure{i}.png'))
        # a click on a histogram bar of the dashboard filters its inspector
        dins = dash.locator('.cream-prompt-inspector')
        position = lambda: dins.locator('.widget-html').first.inner_text()
        assert 'in iteration 1' in position()
        hist.scroll_into_view_if_needed()
        bars = hist.locator('.barlayer .trace').nth(1).locator('.point')
        boxes = [bars.nth(i).bounding_box() for i in range(bars.count())]
        k = max(range(len(boxes)), key=lambda i: (boxes[i] or {}).get('height', 0))   # the tallest bar of iteration 2
        b = boxes[k]
        page.mouse.click(b['x'] + b['width'] / 2, b['y'] + b['height'] - 3)   # plotly hit-tests the position, as for a user
        wait_until(lambda: 'in iteration 2' in position(), 30, 'the dashboard inspector to follow a bar click')
        n_bar = int(re.search(r'of (\d+) shown', position()).group(1))
        assert n_bar >= 1
        dins.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS/'browser-dashboard-after-click.png'))
        # plotly figures: FigureWidgets (inspector 1, dashboard 4, its inspector 1) and the static ones (slope chart, 4 figures)
        plots = page.evaluate("Array.from(document.querySelectorAll('.jp-OutputArea-output .js-plotly-plot, .jp-OutputArea-output.js-plotly-plot'))"
                              ".filter(e => e.querySelector('.main-svg')).map(e => e.closest('.cream-prompt-inspector, .cream-dashboard') ? 'widget' : 'static')")
        assert (plots.count('widget'), plots.count('static')) == (6, 5), plots
        assert cell_errors(page) == []
        ctx.close()
    assert (ROOT/TUTORIAL).read_bytes() == source, "JupyterLab saved the browser's outputs into the tutorial"

# ---------------------------------------------------------------- the docs pages

@pytest.fixture(scope='module')
def inspect_docs(tmp_path_factory):
    """The docs pages of nbs/63_reporting.widgets.ipynb and the tutorial, built with tools/build_docs.py's own steps
    (nbdev's doc processors, staging, MkDocs --strict) from those notebooks and the index only, so that
    a notebook elsewhere that is mid-edit cannot break this check (`make docs` builds them all)."""
    sys.path.insert(0, str(ROOT/'tools'))
    import build_docs as bd
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    cfg = get_config(str(ROOT))
    srcs = [Path('index.ipynb'), Path('63_reporting.widgets.ipynb'), Path(TUTORIAL).relative_to('nbs')]
    tmp = tmp_path_factory.mktemp('inspect-docs')
    cwd = os.getcwd(); os.chdir(ROOT)
    try:
        for s in srcs: proc = Path(proc_nbs(str(cfg.nbs_path), n_workers=0, file_glob=s.name))
    finally: os.chdir(cwd)
    for s in srcs: (tmp/'nbs'/s).parent.mkdir(parents=True, exist_ok=True); shutil.copy(cfg.nbs_path/s, tmp/'nbs'/s)
    pages = bd.stage(proc, tmp/'nbs', tmp/'docs', f"{cfg.get('doc_host', '')}{cfg.get('doc_baseurl', '')}")
    bd.copy_assets(tmp/'docs')
    bd.mkdocs_build(tmp/'docs', tmp/'site', pages, tmp)
    assert bd.external_assets(tmp/'site') == {}
    return tmp/'site'

@pytest.mark.parametrize('page_path,min_plots', [('reporting.widgets.html', 5), ('tutorials/walkthrough.html', 5)])
def test_docs_pages_show_the_plotly_figures(inspect_docs, page_path, min_plots, tmp_path):
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        ctx = browser(p, tmp_path)
        page = ctx.new_page()
        errors, requests = [], []
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.on('request', lambda r: requests.append(r.url))
        page.goto((inspect_docs/page_path).as_uri()); page.wait_for_load_state('load')
        page.wait_for_selector('.js-plotly-plot .main-svg', timeout=30_000)
        plots = page.locator('.js-plotly-plot')
        wait_until(lambda: page.locator('.js-plotly-plot .main-svg').count() >= min_plots, 30, f'{min_plots} plots on {page_path}')
        assert plots.count() >= min_plots
        assert page.locator('.cream-prompt .cream-response').count() >= 4       # the responses side by side, as static HTML
        name = page_path.replace('/', '-').removesuffix('.html')
        page.screenshot(path=str(ARTIFACTS/f'docs-{name}.png'), full_page=True)
        for i in range(min(plots.count(), 8)): plots.nth(i).screenshot(path=str(ARTIFACTS/f'docs-{name}-plot{i}.png'))
        ctx.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(('file:', 'data:', 'blob:', 'about:'))] == []
