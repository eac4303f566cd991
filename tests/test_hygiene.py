"Notebooks stay diffable: no saved widget state, no inlined JavaScript, each under the size limit."
import json, shutil, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import check_sync as cs

def _nb(path, widgets=False, js=False, pad=0):
    cell = {'cell_type': 'code', 'id': 'c1', 'metadata': {}, 'execution_count': 1, 'source': 'x = 1' + ' ' * pad,
            'outputs': [{'output_type': 'display_data', 'metadata': {}, 'data': {'application/javascript': ['alert(1)']}}] if js else []}
    nb = {'cells': [cell], 'metadata': {'kernelspec': {'name': 'python3'}}, 'nbformat': 4, 'nbformat_minor': 5}
    if widgets: nb['metadata']['widgets'] = {'application/vnd.jupyter.widget-state+json': {'state': {}, 'version_major': 2}}
    path.write_text(json.dumps(nb, indent=1)); return path

def test_repository_notebooks_are_diffable():
    nbs = cs.notebooks()
    assert len(nbs) >= 15
    assert cs.check_notebooks(nbs) == []
    total = sum(p.stat().st_size for p in nbs)
    assert total < 5_000_000, f"notebooks total {total/1e6:.1f} MB"

def test_widget_state_is_found_and_stripped(tmp_path):
    p = _nb(tmp_path/'w.ipynb', widgets=True)
    assert cs.notebook_problems(p) == ["saved widget state (metadata.widgets)"]
    msgs = cs.check_notebooks([p])
    assert len(msgs) == 1 and msgs[0].startswith(str(p)) and 'widget state' in msgs[0]
    assert cs.strip_widget_state(p) is True
    assert cs.notebook_problems(p) == [] and 'widgets' not in json.loads(p.read_text())['metadata']
    assert cs.strip_widget_state(p) is False

def test_inlined_javascript_and_size_are_found(tmp_path):
    assert 'inlined JavaScript' in cs.notebook_problems(_nb(tmp_path/'js.ipynb', js=True))[0]
    big = _nb(tmp_path/'big.ipynb', pad=2_000)
    assert cs.notebook_problems(big) == []
    assert cs.notebook_problems(big, max_bytes=1_000) == [f"{big.stat().st_size/1e6:.1f} MB, over the 0.0 MB limit"]

def test_a_cell_without_id_is_found(tmp_path):
    p = _nb(tmp_path/'noid.ipynb')
    nb = json.loads(p.read_text()); nb['cells'][0]['id'] = None; p.write_text(json.dumps(nb))
    assert cs.notebook_problems(p) == ["cells [0] have no id (nbformat 4.5 needs one; the docs build refuses the notebook)"]

def test_sync_check_fails_on_a_notebook_with_widget_state(tmp_path, monkeypatch, capsys):
    p = _nb(tmp_path/'bad.ipynb', widgets=True)
    monkeypatch.setattr(cs, 'notebooks', lambda root=cs.ROOT: [p])
    monkeypatch.setattr(sys, 'argv', ['check_sync.py'])
    with pytest.raises(SystemExit) as e: cs.main()
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert f"{p}: saved widget state" in out and 'make check-sync' in out
    assert 'widgets' in json.loads(p.read_text())['metadata']   # without --fix nothing is changed
