"""Experiment trackers (`loop.report_to`, `--report-to`): what a run sends is read back with each tracker's own reader.

- TensorBoard: a tiny `cream run --report-to tensorboard`, read by TensorBoard's `EventAccumulator`, equals the run's
  own records (the Trainer's loss history, summary.json's accuracy and consistency).
- MLflow: a tiny `cream compare --report-to mlflow` keeps one experiment per comparison and one run per method.
- wandb (offline) and trackio: the tracker's values read back from wandb's offline run file and trackio's database.
- A tracker that is not installed is refused in one line before anything is written; one that fails mid-run
  gives a warning and the run finishes."""
import json, logging, os, struct, subprocess, sys, textwrap
from pathlib import Path

import pytest

CREAM = str(Path(sys.executable).parent/'cream')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
CHEAP = ['--quiet', '--set', 'eval.limit=1', '--set', 'eval.tasks=["arc_easy","gsm8k"]', '--set', 'data.tasks=["arc_easy"]']
FOREIGN = ('Failed to load CPU gemm_4bit_forward from kernels-community',)


def cream(*args, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([CREAM, *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


def losses(history:list) -> dict:
    "step -> loss of a Trainer log history as the stages keep it (`history` in sft_metrics.json / dpo_metrics.json)."
    return {h['step']: h['loss'] for h in history if 'loss' in h}


@pytest.fixture(scope='module')
def tb_run(tmp_path_factory):
    d = tmp_path_factory.mktemp('tb')/'run'
    r = cream('run', '--preset', 'tiny', '--run-dir', d, '--report-to', 'tensorboard', *CHEAP)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_tensorboard_reads_back_the_training_loss_and_each_iterations_metrics(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    d = tb_run
    ea = EventAccumulator(str(d/'tensorboard')); ea.Reload()
    scal = lambda tag: {e.step: e.value for e in ea.Scalars(tag)}
    # the Trainer's step logging: SFT's and each DPO stage's loss at every step, as the stages recorded them
    sft = losses(json.loads((d/'sft_metrics.json').read_text())['history'])
    assert sft and scal('sft/loss') == pytest.approx(sft, rel=1e-6)
    for t in (1, 2):
        dpo = losses(json.loads((d/f'iter{t}'/'dpo_metrics.json').read_text())['history'])
        assert dpo and scal(f'dpo/iter{t}/loss') == pytest.approx(dpo, rel=1e-6)
        assert f'dpo/iter{t}/rewards/margins' in ea.Tags()['scalars']
    # each iteration's metrics at step t (0: M1), equal to summary.json
    s = json.loads((d/'summary.json').read_text())
    assert scal('eval/average') == pytest.approx({0: s['m1_eval']['average'], **{i['iteration']: i['eval']['average'] for i in s['iterations']}})
    for task in ('arc_easy', 'gsm8k'):
        lo, hi = s['iterations'][1]['eval']['interval'][task]
        assert (scal(f'eval/{task}/acc_lo')[2], scal(f'eval/{task}/acc_hi')[2]) == pytest.approx((lo, hi))
    assert scal('consistency/mean') == pytest.approx({i['iteration']: i['consistency']['mean'] for i in s['iterations']})
    assert scal('pairs/made') == {i['iteration']: i['pairs']['pairs'] for i in s['iterations']}


def test_reporting_is_not_part_of_any_fingerprint(tb_run):
    "A rerun without the tracker skips every stage: where a run reports changes nothing it makes."
    r = cream('run', '--run-dir', tb_run, '--report-to', 'none', '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(l) for l in (tb_run/'stages.jsonl').read_text().splitlines()]
    last = events[[i for i, e in enumerate(events) if e['stage'] == 'sft'][-1]:]
    assert {e['event'] for e in last} == {'skip'}, last


def test_compare_keeps_one_mlflow_run_per_method_in_one_experiment(tmp_path):
    from mlflow import MlflowClient
    d = tmp_path/'cmp'
    r = cream('compare', '--preset', 'tiny', '--run-dir', d, '--methods', 'm1', 'dpo', '--iterations', '1',
              '--reference', 'dpo', '--report-to', 'mlflow', *CHEAP)
    assert r.returncode == 0, r.stderr[-3000:]
    c = MlflowClient(tracking_uri=f"sqlite:///{d/'mlflow.db'}")
    exp = c.get_experiment_by_name('cmp')
    runs = {x.info.run_name: x for x in c.search_runs([exp.experiment_id])}
    assert sorted(runs) == ['dpo', 'm1']
    hist = lambda m, key: {x.step: x.value for x in c.get_metric_history(runs[m].info.run_id, key)}
    dpo = losses(json.loads((d/'dpo'/'iter1'/'dpo_metrics.json').read_text())['history'])
    assert hist('dpo', 'dpo/iter1/loss') == pytest.approx(dpo, rel=1e-6)
    s = json.loads((d/'dpo'/'summary.json').read_text())
    assert hist('dpo', 'eval/average') == pytest.approx({0: s['m1_eval']['average'], 1: s['iterations'][0]['eval']['average']})
    assert list(hist('m1', 'eval/average')) == [0] and runs['m1'].data.params['loop.report_to'] == 'mlflow'


def _run_script(code:str, env:dict) -> str:
    r = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def _wandb_records(path:Path) -> list:
    "The records of a wandb offline run file: a 7-byte header, then LevelDB-log blocks of 32 KiB holding protobuf `Record`s."
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, out = path.read_bytes(), 7, b'', []
    assert data[:4] == b':W&B', data[:8]
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7: pos += 32768 - pos % 32768; continue   # a block's tail too short for a header is padding
        _, n, kind = struct.unpack('<IHB', data[pos:pos+7]); pos += 7
        if kind == 0 and n == 0: break
        buf += data[pos:pos+n]; pos += n
        if kind in (1, 4): r = pb.Record(); r.ParseFromString(buf); out.append(r); buf = b''   # FULL or LAST
    return out


def test_wandb_offline_keeps_each_groups_own_step(tmp_path):
    _run_script(f"""
        from cream_nb.runs.tracking import open_tracker
        tr = open_tracker('wandb', {str(tmp_path)!r}, 'cream-avg', 'cmp', config={{'loop.method': 'cream'}})
        tr.log({{'sft/loss': 2.5}}, 3); tr.log({{'eval/average': 0.25}}, 0); tr.log({{'dpo/iter1/loss': 0.69}}, 1)
        assert tr.backend is not None
        tr.close()""", {**os.environ, 'WANDB_SILENT': 'true'})
    (f,) = (tmp_path/'wandb').glob('offline-run-*/run-*.wandb')
    rows = [{(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in _wandb_records(f) if r.WhichOneof('record_type') == 'history']
    mine = [{k: v for k, v in row.items() if not k.startswith('_')} for row in rows]
    assert mine == [{'sft/loss': 2.5, 'sft/step': 3}, {'eval/average': 0.25, 'eval/step': 0}, {'dpo/iter1/loss': 0.69, 'dpo/iter1/step': 1}]
    run = [r.run for r in _wandb_records(f) if r.WhichOneof('record_type') == 'run'][0]
    assert (run.display_name, run.run_group) == ('cream-avg', 'cmp')


def test_trackio_writes_its_local_database(tmp_path):
    out = _run_script(f"""
        import json
        from cream_nb.runs.tracking import open_tracker
        tr = open_tracker('trackio', {str(tmp_path)!r}, 'dpo', 'cmp')
        tr.log({{'eval/average': 0.25}}, 0); tr.log({{'eval/average': 0.3, 'consistency/mean': 0.6}}, 1)
        assert tr.backend is not None
        tr.close()
        from trackio.sqlite_storage import SQLiteStorage
        print(json.dumps([{{k: v for k, v in row.items() if k != 'timestamp'}} for row in SQLiteStorage.get_logs('cmp', 'dpo')]))""",
        {**os.environ, 'TRACKIO_DIR': str(tmp_path/'trackio')})
    rows = json.loads([l for l in out.splitlines() if l.startswith('[')][-1])   # trackio prints its own lines too
    assert rows == [{'eval/average': 0.25, 'step': 0}, {'eval/average': 0.3, 'consistency/mean': 0.6, 'step': 1}]
    assert (tmp_path/'trackio'/'cmp.db').exists()


def test_a_tracker_not_installed_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    from cream_nb.core import config as C
    from cream_nb.cli import main
    monkeypatch.setitem(C.TRACKERS, 'wandb', 'no_such_module_for_this_test')
    for argv in (['run', '--preset', 'tiny', '--run-dir', str(tmp_path/'run'), '--report-to', 'wandb'],
                 ['compare', '--preset', 'tiny', '--run-dir', str(tmp_path/'cmp'), '--report-to', 'wandb'],
                 ['run', '--preset', 'tiny', '--run-dir', str(tmp_path/'run'), '--set', 'loop.report_to="wandb"']):
        assert main(argv) == 2
        err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith(FOREIGN)]
        assert len(err) == 1 and err[0].startswith('cream: error: loop.report_to = ') and "pip install 'cream_nb[wandb]'" in err[0], err
    assert not (tmp_path/'run').exists() and not (tmp_path/'cmp').exists()


def test_a_tracker_failing_mid_run_is_a_warning_and_the_run_finishes(tmp_path, monkeypatch, caplog):
    "The backend's writes fail from the 4th on, as with a full disk: one warning, and the run ends as usual."
    from cream_nb.runs import tracking
    from cream_nb.runs.run import CreamRun
    from cream_nb.core.config import preset, apply_overrides
    calls = []
    class Failing:
        def __init__(self, *a): pass
        def log(self, metrics, step):
            calls.append(step)
            if len(calls) > 3: raise OSError(28, 'No space left on device')
        def close(self): raise AssertionError('a switched-off tracker is not closed')
    monkeypatch.setitem(tracking.BACKENDS, 'tensorboard', Failing)
    cfg = apply_overrides(preset('tiny'), ['loop.report_to="tensorboard"', 'loop.iterations=1', 'eval.limit=1',
                                           'eval.tasks=["arc_easy"]', 'data.tasks=["arc_easy"]'])
    with caplog.at_level(logging.WARNING, logger='cream_nb'):
        s = CreamRun(cfg, tmp_path/'run', progress=False).run()
    assert len(calls) == 4   # a switched-off tracker is not called again
    warned = [r.getMessage() for r in caplog.records if 'tracker tensorboard failed' in r.getMessage()]
    assert len(warned) == 1 and 'No space left on device' in warned[0] and 'the run goes on' in warned[0], warned
    assert [i['done'] for i in s['iterations']] == [['sample', 'score', 'consistency', 'pairs', 'train', 'evaluate']]
