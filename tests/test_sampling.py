"Multi-process sampling: `accelerate launch` on 2 CPU processes gives exactly the records of 1 process."
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT/'tests'/'scripts'/'sample_dist.py'
BIN = Path(sys.executable).parent

def _run(cmd, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'CUDA_VISIBLE_DEVICES': ''}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

def _read(d:Path) -> dict: return {p.name: json.loads(p.read_text()) for p in sorted(d.glob('rank*.json'))}

@pytest.mark.slow
def test_two_processes_give_the_records_of_one(tmp_path):
    _run([sys.executable, SCRIPT, tmp_path/'one'], tmp_path)
    # `--multi_gpu` is accelerate's torchrun launcher; without GPUs the processes run on CPU over gloo
    # (`--cpu` would start a single process unless MPI is installed)
    _run([BIN/'accelerate', 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no',
          '--dynamo_backend', 'no', SCRIPT, tmp_path/'two'], tmp_path)
    one, two = _read(tmp_path/'one'), _read(tmp_path/'two')
    assert list(one) == ['rank0.json'] and one['rank0.json']['world_size'] == 1
    assert list(two) == ['rank0.json', 'rank1.json'], "accelerate launch did not run 2 processes"
    assert [two[k]['world_size'] for k in two] == [2, 2]
    # 5 prompts in batches of 2 -> batches 0, 1, 2 (seeds 11, 12, 13): rank 0 takes 0 and 2, rank 1 takes 1
    assert one['rank0.json']['batch_seeds'] == [11, 12, 13]
    assert two['rank0.json']['batch_seeds'] == [11, 13] and two['rank1.json']['batch_seeds'] == [12]
    recs = one['rank0.json']['records']
    assert [r['prompt_id'] for r in recs] == ['q0', 'q1', 'q2', 'q3', 'q4']
    assert all(len(r['responses']) == 3 and len(r['response_token_ids']) == 3 for r in recs)
    assert len({tuple(ids) for r in recs for ids in r['response_token_ids']}) == 15   # 15 distinct samples
    assert two['rank0.json']['records'] == recs and two['rank1.json']['records'] == recs


def test_resume_from_batch_log_generates_only_missing_batches(tmp_path, monkeypatch):
    "A batch log left by a killed run (last line cut short) is reused: same records, only missing batches generated."
    from cream_nb.stages import sampling as S
    from cream_nb.core.config import SamplingConfig
    from cream_nb.models.loading import load_model
    model, tok = load_model('tiny')
    ps = [{'id': f'q{i}', 'messages': [{'role': 'user', 'content': 'Tell me ' * (i + 1)}]} for i in range(7)]
    cfg = SamplingConfig(n_responses=3, max_new_tokens=5, batch_size=2, seed=11)
    full = S.sample_responses(model, tok, ps, cfg, progress=False, resume_path=tmp_path/'a.log')
    lines = (tmp_path/'a.log').read_text().splitlines()
    assert len(lines) == 4
    (tmp_path/'b.log').write_text('\n'.join(lines[:2]) + '\n' + lines[2][:25])
    from cream_nb.models.engine import HFEngine
    seeds = []
    orig = HFEngine._generate_batch
    monkeypatch.setattr(HFEngine, '_generate_batch', lambda self, *a: seeds.append(a[-1]) or orig(self, *a))
    assert S.sample_responses(model, tok, ps, cfg, progress=False, resume_path=tmp_path/'b.log') == full
    assert seeds == [13, 14]
    # a log made for other prompts is not used
    seeds.clear()
    other = [dict(p, id=p['id'] + 'x') for p in ps]
    S.sample_responses(model, tok, other, cfg, progress=False, resume_path=tmp_path/'a.log')
    assert seeds == [11, 12, 13, 14]


def test_same_seed_same_records_other_seed_other_records():
    from cream_nb.core.config import SamplingConfig
    from cream_nb.models.loading import load_model
    from cream_nb.stages.sampling import sample_responses
    model, tok = load_model('tiny')
    ps = [{'id': f'q{i}', 'messages': [{'role': 'user', 'content': 'Name a number ' * (i + 1)}]} for i in range(5)]
    run = lambda seed: sample_responses(model, tok, ps, SamplingConfig(n_responses=3, max_new_tokens=6, batch_size=2, seed=seed), progress=False)
    a, b, c = run(5), run(5), run(6)
    assert a == b
    assert [r['prompt_id'] for r in a] == [p['id'] for p in ps] and all(len(r['responses']) == 3 for r in a)
    assert a != c
