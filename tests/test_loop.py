"""End-to-end tests of the iteration loop on the tiny model: a full run, resume after a kill, refused and forced redos.
(Each method's own iteration runs in tests/test_methods.py.)"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import pytest

from cream_nb.core.config import preset, apply_overrides
from cream_nb.core.artifacts import read_json, read_jsonl
from cream_nb.runs.run import CreamRun
from cream_nb.core.artifacts import StageMismatch
from cream_nb.runs.summary import STAGES, run_summary

from conftest import CREAM
TIMING = ('seconds', 'runtime', 'per_second', 'timings', 'finished', 'run_dir')


def differences(a, b, path=''):
    "Where two JSON-like values differ, as readable paths (for assertion messages)."
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in differences(a.get(k), b.get(k), f'{path}.{k}')]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f'{path}[{i}]')]
    return [] if a == b else [f'{path}: {a!r:.80} != {b!r:.80}']


def strip_timings(x):
    "The summary without wall-clock values (they differ between runs, everything else must not)."
    if isinstance(x, dict): return {k: strip_timings(v) for k, v in x.items() if not any(t in k for t in TIMING)}
    if isinstance(x, list): return [strip_timings(v) for v in x]
    return x


def test_full_run_summary_has_every_field(tiny_run):
    d, out = tiny_run
    s = read_json(d/'summary.json')
    assert s['method'] == 'cream' and s['preset'] == 'tiny' and s['iterations_planned'] == 2
    assert s['sft']['steps'] >= 1 and s['m1_eval']['n'] == {t: 3 for t in preset('tiny').eval.tasks}
    assert [it['iteration'] for it in s['iterations']] == [1, 2]
    for it in s['iterations']:
        assert it['done'] == list(STAGES)
        assert set(it['eval']['accuracy']) == set(preset('tiny').eval.tasks)
        assert 0 <= it['consistency']['set'] <= 1 and sum(it['consistency']['histogram']['counts']) == it['consistency']['n']
        assert it['pairs']['pairs'] + it['pairs']['skipped_equal_rewards'] + it['pairs']['skipped_identical_text'] \
            + it['pairs']['skipped_unscored'] + it['pairs']['missing'] == it['pairs']['prompts']
        assert it['reward_margin']['mean'] >= 0          # chosen is the best response by M_t's own reward
        assert it['dpo']['steps'] >= 1 and it['reward_accuracy'] is not None
        assert all(v is not None and v >= 0 for v in it['timings'].values())
    # the one-screen table at the end of the command
    assert 'm3 (iter 2)' in out and 'avg' in out
    # the registry knows every model and its reference
    reg = read_json(d/'checkpoints.json')
    assert {k: v['reference'] for k, v in reg.items()} == {'m0': None, 'm1': 'm0', 'm2': 'm1', 'm3': 'm2'}


def test_scored_models_per_iteration(tiny_run):
    "Iteration 1 scores m1 and m0, iteration 2 scores m2, m1 and m0: each once, stored beside the samples."
    d, _ = tiny_run
    assert sorted(p.name for p in (d/'iter1').glob('logps_*.jsonl')) == ['logps_m0.jsonl', 'logps_m1.jsonl']
    assert sorted(p.name for p in (d/'iter2').glob('logps_*.jsonl')) == ['logps_m0.jsonl', 'logps_m1.jsonl', 'logps_m2.jsonl']
    # the DPO reference log-probs in the pairs are M_t's stored log-probs of chosen and rejected
    from cream_nb.core.artifacts import load_dataset_dir
    pairs = load_dataset_dir(d/'iter2'/'pairs')
    lp = {r['prompt_id']: r['logps'] for r in read_jsonl(d/'iter2'/'logps_m2.jsonl')}
    for row in pairs:
        assert row['ref_chosen_logps'] == pytest.approx(lp[row['prompt_id']][row['chosen_index']])
        assert row['ref_rejected_logps'] == pytest.approx(lp[row['prompt_id']][row['rejected_index']])


def test_kill_during_iteration2_sampling_then_resume(tiny_run, tmp_path):
    d_full, _ = tiny_run
    d = tmp_path/'killed'
    p = subprocess.Popen(CREAM + ['run', '--preset', 'tiny', '--run-dir', str(d), '--quiet'],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = d/'stages.jsonl'
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if log.exists() and '"iter2/sample", "event": "start"' in log.read_text(): break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before iteration 2's sampling started"
    part = None   # wait until at least one batch of iteration 2's samples is in the batch log, then kill
    while time.time() < deadline and p.poll() is None and part is None:
        part = next((f for f in (d/'iter2').glob('.samples.partial-*') if f.read_text().count('\n') >= 1), None)
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert part is not None and part.exists(), "no sampling batch was logged before the kill"
    logged = part.read_text().count('\n')
    assert not (d/'iter2'/'_stage_sample.json').exists()
    n_before = len(read_jsonl(log))
    r = subprocess.run(CREAM + ['run', '--preset', 'tiny', '--run-dir', str(d), '--quiet'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [e for e in read_jsonl(log)[n_before:]]
    events = {(e['stage'], e['event']) for e in resumed}
    for st in ['sft', 'eval_m1'] + [f'iter1/{s}' for s in STAGES]:
        assert (st, 'skip') in events and (st, 'start') not in events, st
    for s in STAGES: assert (f'iter2/{s}', 'start') in events
    assert not part.exists()           # the batch log is removed once samples.jsonl is complete
    assert (d/'iter2'/'samples.jsonl').read_text() == (d_full/'iter2'/'samples.jsonl').read_text()
    assert 1 <= logged < 4              # it was killed half-way through the 4 batches of the tiny preset
    a, b = strip_timings(read_json(d/'summary.json')), strip_timings(read_json(d_full/'summary.json'))
    assert a == b, differences(a, b)[:10]


def _copy_sft(src:Path, dst:Path):
    "A new run directory holding only the SFT stage of `src` (same config => skipped)."
    dst.mkdir(parents=True)
    for f in ['m1', '_stage_sft.json', 'sft_metrics.json', 'config.json']:
        (shutil.copytree if (src/f).is_dir() else shutil.copy)(src/f, dst/f)
    reg = read_json(src/'checkpoints.json')
    (dst/'checkpoints.json').write_text(json.dumps({k: reg[k] for k in ('m0', 'm1')}))


def test_changed_config_is_refused_then_forced(tiny_run, tmp_path):
    d_full, _ = tiny_run
    d = tmp_path/'changed'
    _copy_sft(d_full, d)
    with pytest.raises(StageMismatch, match=r'sft\.learning_rate: 0\.001 -> 0\.002'):
        CreamRun(apply_overrides(preset('tiny'), ['sft.learning_rate=0.002']), d, progress=False).sft()
    # nothing was lost: the old M1 is still there and still skipped with the old config
    run = CreamRun(preset('tiny'), d, progress=False)
    run.sft()
    assert run.log.events()[-1]['event'] == 'skip'
    # a CLI user gets one line naming the field and suggesting --force
    r = subprocess.run(CREAM + ['run', '--preset', 'tiny', '--run-dir', str(d), '--set', 'sft.learning_rate=0.002', '--quiet'],
                       capture_output=True, text=True)
    assert r.returncode == 2 and 'sft.learning_rate' in r.stderr and '--force' in r.stderr


def test_corrupt_artifact_names_the_file_and_force_redoes_it(tiny_run, tmp_path):
    d = tmp_path/'corrupt'
    shutil.copytree(tiny_run[0], d)
    good = (d/'iter1'/'rewards.jsonl').read_text()
    (d/'iter1'/'rewards.jsonl').write_text('{"prompt_id": "x", "current": [1.0, \n')
    r = subprocess.run(CREAM + ['run', '--preset', 'tiny', '--run-dir', str(d), '--quiet'], capture_output=True, text=True)
    assert r.returncode == 2
    assert 'iter1/score' in r.stderr and 'rewards.jsonl line 1 is corrupt' in r.stderr and '--force' in r.stderr
    r = subprocess.run(CREAM + ['run', '--preset', 'tiny', '--run-dir', str(d), '--quiet', '--force'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (d/'iter1'/'rewards.jsonl').read_text() == good   # redone from the stored log-probs, same rewards
    a, b = strip_timings(read_json(d/'summary.json')), strip_timings(read_json(tiny_run[0]/'summary.json'))
    assert a == b, differences(a, b)[:10]


def test_bad_cli_input(tmp_path):
    for args, msg in [(['--preset', 'huge'], "invalid choice: 'huge'"), (['--method', 'ppo'], "invalid choice: 'ppo'"),
                      (['--set', 'sampling.n_responses=1'], 'sampling.n_responses = 1 is invalid'),
                      (['--set', 'dpo.betta=1'], "unknown field 'betta'")]:
        r = subprocess.run(CREAM + ['run', '--run-dir', str(tmp_path/'x')] + args, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)

def test_bf16_without_bf16_matmuls_stops_before_any_work(tmp_path, monkeypatch):
    "An explicit reward.precision / eval.precision of bf16 on a machine without bf16 matmuls: one ConfigError naming the switch."
    from cream_nb.models import precision as R
    from cream_nb.core.config import ConfigError, apply_overrides, preset
    from cream_nb.runs.run import CreamRun
    monkeypatch.setattr(R, 'bf16_matmuls', lambda device='cpu': False)
    for switch in ('reward.precision', 'eval.precision'):
        run = CreamRun(apply_overrides(preset('tiny'), [f'{switch}="bf16"']), tmp_path/switch, progress=False)
        with pytest.raises(ConfigError, match=rf"{switch}='bf16' needs bf16 matmul instructions"): run.run()
        assert not (tmp_path/switch/'config.json').exists()
    assert CreamRun(preset('tiny'), tmp_path/'auto', progress=False).precision('reward.precision') == 'fp32'
