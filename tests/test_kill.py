"""SIGKILL (to the process group) inside every stage, then rerun: the run ends equal to an uninterrupted one.

Two chains of kills on the `tiny` preset, each in its own run directory: chain `early` kills each stage right
after it starts, chain `late` kills each stage in the middle of its work (after a Trainer checkpoint, a
generation batch, one scored model). Each kill is followed by a rerun of the same command, which is itself
killed at the next point; the last rerun finishes. Both finished directories must equal an uninterrupted
run's, file by file (timings, pids and the stage log aside), adapters included (sha256), and SFT and DPO
killed after a checkpoint must have resumed from it, not from step 0."""
import hashlib, json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
# the worktree's cream_nb, whatever the installed console script points at
CREAM = [sys.executable, '-c', 'import sys; from cream_nb.cli import main; sys.exit(main(sys.argv[1:]))']
# checkpoints every step so a kill can land after one; 2 SFT epochs: 4 SFT steps; DPO: 2 steps per iteration;
ARGS = ['run', '--preset', 'tiny', '--quiet', '--set', 'sft.save_steps=1', '--set', 'dpo.save_steps=1', '--set', 'sft.epochs=2',
        '--set', 'eval.batch_size=4']   # 4 evaluation batches, so a kill can land between two of them
VOLATILE = {'seconds', 'seconds_per_step', 'finished', 'time', 'pid', 'timings', 'run_dir', 'since'}
POLL_S = 0.01

pytestmark = pytest.mark.slow

def env():
    return {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}

def cream(run_dir, extra=()) -> subprocess.Popen:
    return subprocess.Popen(CREAM + ARGS + list(extra) + ['--run-dir', str(run_dir)], cwd=ROOT, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def events(run_dir) -> list:
    p = Path(run_dir)/'stages.jsonl'
    out = []
    if p.exists():
        for line in p.read_text().splitlines():
            try: out.append(json.loads(line))
            except json.JSONDecodeError: pass
    return out

def started(stage):
    "Kill point: `stage` has logged its start in this process."
    return lambda d, pid: any(e['stage'] == stage and e['event'] == 'start' and e.get('pid') == pid for e in events(d))

def lines_in(pattern):
    "Kill point: a batch log matching `pattern` holds at least one finished batch."
    return lambda d, pid: any(p.stat().st_size > 0 for p in Path(d).glob(pattern))

def exists(pattern):
    return lambda d, pid: any(Path(d).glob(pattern))

CHAINS = {
    'early': [('sft', started('sft')), ('eval_m1', started('eval_m1')), ('iter1/sample', started('iter1/sample')),
              ('iter1/score', started('iter1/score')), ('iter1/train', started('iter1/train')),
              ('iter1/evaluate', started('iter1/evaluate'))],
    'late': [('sft', exists('.m1.checkpoints-*/checkpoint-*/complete')), ('eval_m1', lines_in('.eval_m1.partial-*')),
             ('iter1/sample', lines_in('iter1/.samples.partial-*')), ('iter1/score', exists('iter1/logps_m1.jsonl')),
             ('iter2/sample', lines_in('iter2/.samples.partial-*')), ('iter2/score', exists('iter2/logps_m2.jsonl')),
             ('iter2/train', exists('iter2/.model.checkpoints-*/checkpoint-*/complete')),
             ('iter2/evaluate', lines_in('iter2/.eval.partial-*'))],
}

def kill_at(run_dir, stage, point, timeout=600, extra=()) -> str:
    "Run `cream run` until `point` holds, SIGKILL its process group; returns the process's stderr."
    p = cream(run_dir, extra)
    t0 = time.time()
    while not point(run_dir, p.pid):
        if p.poll() is not None:
            pytest.fail(f"cream ended (rc {p.returncode}) before the kill point in {stage}:\n{p.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout: os.killpg(p.pid, signal.SIGKILL); pytest.fail(f"kill point in {stage} not reached in {timeout} s")
        time.sleep(POLL_S)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return p.stderr.read()

def finish(run_dir, extra=()) -> str:
    p = cream(run_dir, extra)
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    return err

def _strip(x):
    if isinstance(x, dict): return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list): return [_strip(v) for v in x]
    return x

def content(path:Path):
    "What must be equal between runs: JSON without timings and pids, every other file byte for byte."
    if path.suffix == '.json': return _strip(json.loads(path.read_text()))
    if path.suffix == '.jsonl': return [_strip(json.loads(l)) for l in path.read_text().splitlines() if l.strip()]
    return hashlib.sha256(path.read_bytes()).hexdigest()

def files(d:Path) -> dict:
    return {str(p.relative_to(d)): p for p in sorted(d.rglob('*')) if p.is_file() and p.name not in ('stages.jsonl', '.lock')}

def assert_same_run(got:Path, ref:Path):
    a, b = files(got), files(ref)
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    diff = [k for k in a if content(a[k]) != content(b[k])]
    assert diff == [], diff
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    adapters = [k for k in a if k.endswith('.safetensors')]
    assert len(adapters) >= 3 and all(sha(a[k]) == sha(b[k]) for k in adapters)   # m1, m2, m3

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "An uninterrupted run with the same settings."
    d = tmp_path_factory.mktemp('kill')/'reference'
    finish(d)
    return d

@pytest.mark.parametrize('chain', list(CHAINS))
def test_killed_anywhere_resumes_to_the_same_run(chain, reference, tmp_path):
    d = tmp_path/chain
    logs = {stage: kill_at(d, stage, point) for stage, point in CHAINS[chain]}
    final = finish(d)
    assert not [p for p in d.rglob('*') if '.checkpoints-' in p.name or '.tmp-' in p.name]   # no checkpoints or temp folders left
    assert not (d/'.lock.json').exists()
    assert_same_run(d, reference)
    # every stage of the last rerun that the kills interrupted was redone or resumed, none marked done twice
    done = [e['stage'] for e in events(d) if e['event'] == 'done']
    assert len(done) == len(set(done)), done
    if chain == 'late':   # SFT and DPO killed after a checkpoint resumed from it, not from step 0
        after_sft = logs['eval_m1']   # the rerun after the SFT kill finished SFT (then was killed in eval_m1)
        step = re.search(r'resuming training from \S+checkpoint-(\d+) \(step (\d+)\)', after_sft)
        assert step and int(step.group(2)) >= 1, after_sft[-2000:]
        step = re.search(r'resuming training from \S+checkpoint-(\d+) \(step (\d+)\)', logs['iter2/evaluate'])
        assert step and int(step.group(2)) >= 1, logs['iter2/evaluate'][-2000:]


# a method registered after the loop was written (ScPO: its own votes.json, skip reasons and pair weights) resumes the same way
SCPO = ['--method', 'scpo']
SCPO_CHAIN = [('iter1/sample', started('iter1/sample')), ('iter1/score', started('iter1/score')), ('iter1/pairs', started('iter1/pairs')),
              ('iter1/train', started('iter1/train')), ('iter2/score', started('iter2/score')), ('iter2/train', started('iter2/train'))]

def test_a_killed_scpo_run_resumes_to_the_same_run(tmp_path):
    ref, d = tmp_path/'reference', tmp_path/'killed'
    finish(ref, SCPO)
    for stage, point in SCPO_CHAIN: kill_at(d, stage, point, extra=SCPO)
    finish(d, SCPO)
    assert json.loads((d/'config.json').read_text())['loop']['method'] == 'scpo'
    assert (d/'iter1'/'votes.json').exists() and (d/'iter2'/'votes.json').exists()
    assert not [p for p in d.rglob('*') if '.checkpoints-' in p.name or '.tmp-' in p.name]
    assert_same_run(d, ref)
    done = [e['stage'] for e in events(d) if e['event'] == 'done']
    assert len(done) == len(set(done)), done


# methods that pick pairs of their own (`Method.extra_pairs`): Meta-Rewarding judges, samples judgements and meta-judges inside
# its score stage; Temporal has M1 sample the anchor responses there. Killed in those stages, they resume the same way.
OWN_PAIRS = {'meta-rewarding': 'meta_judge.json', 'temporal': 'anchored_pairs.json'}
OWN_CHAIN = [('iter1/score', started('iter1/score')), ('iter1/pairs', started('iter1/pairs')), ('iter2/score', started('iter2/score')),
             ('iter2/score', exists('iter2/logps_m2.jsonl')), ('iter2/train', started('iter2/train'))]

@pytest.mark.parametrize('method', list(OWN_PAIRS))
def test_a_killed_run_of_a_method_with_its_own_pairs_resumes_to_the_same_run(method, tmp_path):
    extra = ['--method', method, '--set', 'reward.judge_scoring="expected"']   # the tiny model writes no parsable score
    ref, d = tmp_path/'reference', tmp_path/'killed'
    finish(ref, extra)
    for stage, point in OWN_CHAIN: kill_at(d, stage, point, extra=extra)
    finish(d, extra)
    own = [json.loads((d/f'iter{t}'/OWN_PAIRS[method]).read_text()) for t in (1, 2)]
    stats = [json.loads((d/f'iter{t}'/'pairs_stats.json').read_text()) for t in (1, 2)]
    assert [s['pairs'] for s in stats] == [len(o['pairs']) for o in own] and sum(s['pairs'] for s in stats) >= 1   # replace: only its own
    assert not [p for p in d.rglob('*') if '.checkpoints-' in p.name or '.tmp-' in p.name]
    assert_same_run(d, ref)
    done = [e['stage'] for e in events(d) if e['event'] == 'done']
    assert len(done) == len(set(done)), done
