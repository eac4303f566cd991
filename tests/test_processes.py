"""One run, many processes: `cream run` and `cream compare` under `accelerate launch` with 2 CPU processes (gloo).

The 2-process runs must equal 1-process runs with the same global batch (per-device batch x processes x
accumulation): samples, log-probs, rewards, consistency, pairs and the trained adapters, byte for byte. That holds
with `model.lora_dropout=0`: SFT's LoRA dropout draws its masks from each process's own random stream, so with
dropout on the two layouts train on other masks (DPO trains without dropout either way). The 2-process run is
then killed (SIGKILL of rank 1) in the middle of DPO and resumed by the same command."""
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest
from test_kill import assert_same_run, events

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DDP = ROOT/'configs'/'accelerate'/'ddp.yaml'
# 16 seed examples: 2 SFT steps of 2 x 4; 8 pairs: 4 DPO steps of 2 x 1; a checkpoint every step (a kill point)
TWO = ['--set', 'sft.batch_size=4', '--set', 'dpo.batch_size=1', '--set', 'model.lora_dropout=0',
       '--set', 'sft.save_steps=1', '--set', 'dpo.save_steps=1', '--set', 'reward.judge_scoring="expected"']
ONE = TWO + ['--set', 'sft.grad_accum=2', '--set', 'dpo.grad_accum=2']   # the same global batches in one process
COMPARED = ['samples.jsonl', 'logps_m0.jsonl', 'logps_m1.jsonl', 'rewards.jsonl', 'consistency.json', 'pairs_stats.json']

pytestmark = pytest.mark.slow

def env():   # torchrun gives each process 1 thread; the 1-process runs get the same, so every matmul is the same
    return {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'CUDA_VISIBLE_DEVICES': ''}

def launch(*args, n=2) -> list:
    return [BIN/'accelerate', 'launch', '--config_file', DDP, '--num_processes', str(n), BIN/'cream', *args]

def run(cmd, ok=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1200)
    if ok and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {p.returncode}\n--- stdout ---\n{p.stdout[-2000:]}\n--- stderr ---\n{p.stderr[-8000:]}", pytrace=False)
    return p

def pairs(d:Path) -> list:
    from datasets import load_from_disk
    return load_from_disk(str(d/'pairs')).to_list()

def adapters(d:Path) -> dict:
    from safetensors.torch import load_file
    return {m: load_file(str(d/m/'adapter_model.safetensors')) for m in ('m1', 'iter1/model', 'iter2/model')}

def assert_same_science(two:Path, one:Path, with_pairs=True):
    "Samples, log-probs, rewards, consistency and pairs identical; adapters identical (the tolerance is 0: see above)."
    for t in (1, 2):
        for f in COMPARED + (['logps_m2.jsonl'] if t == 2 else []):
            if (one/f'iter{t}'/f).exists() or (two/f'iter{t}'/f).exists():
                assert (two/f'iter{t}'/f).read_bytes() == (one/f'iter{t}'/f).read_bytes(), f"iter{t}/{f} differs"
        assert pairs(two/f'iter{t}') == pairs(one/f'iter{t}') and (len(pairs(one/f'iter{t}')) > 0) == with_pairs
    a, b = adapters(two), adapters(one)
    for m in a:
        diff = max((a[m][k] - b[m][k]).abs().max().item() for k in a[m])
        assert diff == 0.0, f"{m}: the 2-process adapter differs from the 1-process one by {diff}"

def test_the_collectives_share_work_and_agree(tmp_path):
    run([BIN/'accelerate', 'launch', '--config_file', DDP, '--num_processes', '2', ROOT/'tests'/'scripts'/'processes_dist.py', tmp_path])
    r = [json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1)]
    assert [(x['world'], x['rank'], x['writer']) for x in r] == [(2, 0, True), (2, 1, False)]
    assert [x['share'] for x in r] == [[0, 2, 4], [1, 3]]
    assert r[0]['computed'] == [[1, 2], [4, 5], [7]] and r[1]['computed'] == [[3], [6]]   # each its own share only
    want = [[0, [1, 4]], [1, [9]], [2, [16, 25]], [3, [36]], [4, [49]]]
    assert r[0]['result'] == r[1]['result'] == want                                        # all results, batch order
    assert {x['decided'] for x in r} == {'decided by rank 0'}
    assert r[0]['gathered'] == r[1]['gathered'] == [0, 1, 1]
    assert r[0]['seen_written'] == r[1]['seen_written'] == {'writer_rank': 0}               # rank 1 wrote nothing

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp('processes')
    t0 = time.time(); run([BIN/'cream', 'run', '--preset', 'tiny', '--quiet', '--run-dir', d/'one', *ONE]); one_s = time.time() - t0
    t0 = time.time(); p = run(launch('run', '--preset', 'tiny', '--quiet', '--run-dir', d/'two', *TWO)); two_s = time.time() - t0
    print(f"tiny run: 1 process {one_s:.0f} s, 2 processes {two_s:.0f} s (wall, launcher included)")
    return d, p

def test_two_processes_make_the_run_of_one(runs):
    d, p = runs
    assert 'on 2 processes' in p.stdout and 'global batch: SFT 4 x 2 processes x 1 accumulation = 8' in p.stdout
    assert p.stdout.count('cream: finished') == 1                     # the main process speaks for the run
    assert_same_science(d/'two', d/'one')
    ev = events(d/'two')
    assert len({e['pid'] for e in ev}) == 1                           # one writer: the main process logged every stage
    done = [e['stage'] for e in ev if e['event'] == 'done']
    assert len(done) == len(set(done)) and 'iter2/evaluate' in done   # each stage ran once, not once per process
    left = [p.name for p in (d/'two').rglob('*') if '.partial-' in p.name or '.tmp-' in p.name or '.checkpoints-' in p.name]
    assert left == [] and not (d/'two'/'.lock.json').exists()

def _workers(launcher:int) -> dict:
    "rank -> pid of the processes `accelerate launch` (pid `launcher`) started."
    out = {}
    for c in Path(f'/proc/{launcher}/task/{launcher}/children').read_text().split():
        try: e = dict(kv.split('=', 1) for kv in Path(f'/proc/{c}/environ').read_text().split('\0') if '=' in kv)
        except FileNotFoundError: continue
        if 'RANK' in e: out[int(e['RANK'])] = int(c)
    return out

def test_kill_one_process_mid_dpo_then_resume(runs, tmp_path):
    d, _ = runs
    run_dir = tmp_path/'killed'
    cmd = [str(c) for c in launch('run', '--preset', 'tiny', '--quiet', '--run-dir', run_dir, *TWO)]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not list(run_dir.glob('iter1/.model.checkpoints-*/checkpoint-*/complete')):   # DPO of iteration 1 saved a step
        assert p.poll() is None, p.stderr.read()[-3000:]
        if time.time() - t0 > 600: os.killpg(p.pid, signal.SIGKILL); pytest.fail("DPO's first checkpoint never appeared")
        time.sleep(0.01)
    workers = _workers(p.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)                     # one process dies: the launcher stops the other
    try: p.wait(timeout=120)
    except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); pytest.fail("rank 0 kept running after rank 1 was killed")
    assert p.returncode != 0 and not any(Path(f'/proc/{w}').exists() for w in workers.values())
    assert not (run_dir/'iter1'/'_stage_train.json').exists()
    r = run(cmd)                                            # the same launch command resumes
    step = re.search(r'resuming training from \S+checkpoint-(\d+) \(step (\d+)\)', r.stderr + r.stdout)
    assert step and int(step.group(2)) >= 1, (r.stderr + r.stdout)[-3000:]
    assert_same_run(run_dir, d/'two')                       # as if it had never been killed

def test_a_second_launch_on_the_same_run_dir_is_refused(tmp_path):
    from filelock import FileLock
    (tmp_path/'r').mkdir()
    lock = FileLock(str(tmp_path/'r'/'.lock')); lock.acquire()
    (tmp_path/'r'/'.lock.json').write_text(json.dumps({'pid': 4242, 'host': 'here', 'since': 'now'}))
    try: p = run(launch('run', '--preset', 'tiny', '--quiet', '--run-dir', tmp_path/'r'), ok=False)
    finally: lock.release()
    assert p.returncode != 0
    main = [l for l in p.stderr.splitlines() if l.startswith('cream: error: ')]
    other = [l for l in p.stderr.splitlines() if l.startswith('cream: error (process 1): ')]
    assert len(main) == len(other) == 1, p.stderr[-3000:]
    assert all('is being written by pid 4242 on here' in l for l in main + other)

def test_more_processes_than_prompts_is_refused_in_one_line(tmp_path):
    p = run(launch('run', '--preset', 'tiny', '--quiet', '--run-dir', tmp_path/'r', '--set', 'data.prompts_per_iteration=1'), ok=False)
    lines = [l for l in p.stderr.splitlines() if l.startswith('cream: error:')]
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0] == ("cream: error: 2 processes (--num_processes) for 1 prompts per iteration (data.prompts_per_iteration): "
                        "launch at most 1 processes, or give each iteration more prompts")
    assert not (tmp_path/'r'/'config.json').exists()        # refused before any work

def test_a_deepspeed_launch_without_deepspeed_is_refused_in_one_line(tmp_path):
    "accelerate launch itself refuses a DeepSpeed config when deepspeed is missing; torchrun (or a DeepSpeed env) gets this line."

    import importlib.util
    assert importlib.util.find_spec('deepspeed') is None     # what this test is about: a machine without it
    e = {**env(), 'ACCELERATE_USE_DEEPSPEED': 'true', 'ACCELERATE_DEEPSPEED_ZERO_STAGE': '3'}
    p = subprocess.run([str(BIN/'cream'), 'run', '--preset', 'tiny', '--quiet', '--run-dir', str(tmp_path/'r'),
                        ], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "cream: error: the launch asks for DeepSpeed (an accelerate config with distributed_type: DEEPSPEED) but deepspeed is not "
        "installed: pip install deepspeed, or launch with configs/accelerate/ddp.yaml"], p.stderr[-2000:]

def test_zero3_with_lora_is_refused_in_one_line(monkeypatch):
    "With deepspeed importable (faked here: this machine has none), ZeRO-3 and LoRA adapters are refused."
    import importlib.util
    from cream_nb.core.config import preset
    from cream_nb.runs.base import launch_problem
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: object() if n == 'deepspeed' else real(n, *a))
    monkeypatch.setenv('ACCELERATE_USE_DEEPSPEED', 'true'); monkeypatch.setenv('ACCELERATE_DEEPSPEED_ZERO_STAGE', '3')
    assert launch_problem(preset('tiny')).startswith("ZeRO-3 shards the base model's weights, but with model.finetune='lora'")
    cfg = preset('tiny'); cfg.model.finetune = 'full'
    assert launch_problem(cfg) is None
    monkeypatch.setenv('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')
    assert launch_problem(preset('tiny')) is None

COMPARE_METHODS = ['m1', 'dpo', 'cream-avg', 'oracle', 'srlm']   # srlm: the expected judge, shared by the processes

def test_two_process_compare_equals_one_process_compare(tmp_path):
    base = ['compare', '--preset', 'tiny', '--quiet', '--methods', *COMPARE_METHODS]
    run([BIN/'cream', *base, '--run-dir', tmp_path/'one', *ONE])
    p = run(launch(*base, '--run-dir', tmp_path/'two', *TWO))
    assert p.stdout.count('cream: comparison finished') == 1 and (tmp_path/'two'/'report.html').exists()
    for m in COMPARE_METHODS[1:]:   # the tiny model answers no question right: the oracle's rewards all tie, no pairs
        assert_same_science(tmp_path/'two'/m, tmp_path/'one'/m, with_pairs=m != 'oracle')
    a, b = (json.loads((tmp_path/x/'compare.json').read_text()) for x in ('two', 'one'))
    assert a['accuracy'] == b['accuracy'] and a.get('consistency') == b.get('consistency')
