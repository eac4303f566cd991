"""Bad input, swept: config files and --set values, data files, run directories (every artifact kind cut short,
emptied, deleted or invalid, a cut-short safetensors file), model names and CLI misuse.

Each case runs `cream` in-process (`cream_nb.cli.main`) and must exit 2 with ONE line, `cream: error: ...`,
naming the file, row or field and what to do, and leave every file already in the run directory byte for byte.
The finished run is the session's tiny run (tests/conftest.py); each case corrupts a copy of it. A few cases
then follow the advice and check that it works."""
import hashlib, json, os, shutil, signal, subprocess, sys
from pathlib import Path
import pytest
from cream_nb.cli import main

def tree(d:Path) -> dict:
    "sha256 of every file under `d` (the empty lock file aside: it is the lock, not the run's data)."
    d = Path(d)
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob('*'))
            if p.is_file() and p.name != '.lock'} if d.is_dir() else {}

@pytest.fixture
def run_dir(tiny_run, tmp_path):
    d = tmp_path/'run'
    shutil.copytree(tiny_run[0], d, ignore=shutil.ignore_patterns('.lock*'))
    return d

def cream_error(capsys, argv, target:Path) -> str:
    "Run `cream argv`; assert exit 2, one error line, no traceback, `target`'s files untouched; return the line."
    capsys.readouterr()
    before = tree(target)
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith('cream: error:')]
    assert rc == 2, (rc, err[-3000:])
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    after = tree(target)
    assert {k: after.get(k) for k in before} == before, [k for k in before if after.get(k) != before[k]]
    assert set(after) - set(before) <= set(), sorted(set(after) - set(before))   # nothing new either
    return lines[0]

def write(path:Path, text:str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True); path.write_text(text); return path

def truncate(path:Path, keep:float=0.5):
    data = path.read_bytes(); path.write_bytes(data[:int(len(data) * keep)])

def drop_last_line(path:Path):
    lines = path.read_text().splitlines(keepends=True); path.write_text(''.join(lines[:-1]))

ARTIFACTS = Path(__file__).resolve().parents[1]/'test-artifacts'
GOOD_PROMPT = json.dumps({'messages': [{'role': 'user', 'content': 'Why is the sky blue?'}]})
RUN = ['run', '--quiet', '--run-dir']

# (case id, setup(run_dir, tmp) -> argv, fragments the one line must hold)
CASES = [
    # ---- --set values
    ('set-type-str', lambda d, t: RUN + [d, '--set', 'dpo.beta=abc'], ["dpo.beta = 'abc' has the wrong type: expected a number", 'e.g. dpo.beta=0.1']),
    ('set-null', lambda d, t: RUN + [d, '--set', 'dpo.beta=null'], ['dpo.beta = None has the wrong type']),
    ('set-float-for-int', lambda d, t: RUN + [d, '--set', 'sampling.n_responses=2.5'], ['sampling.n_responses = 2.5 has the wrong type: expected an integer']),
    ('set-str-for-list', lambda d, t: RUN + [d, '--set', 'model.lora_target_modules=q_proj'], ["model.lora_target_modules = 'q_proj' has the wrong type: expected a JSON list of strings"]),
    ('set-unknown-field', lambda d, t: RUN + [d, '--set', 'dpo.betta=0.2'], ["unknown field 'betta'", "dpo has"]),
    ('set-unknown-section', lambda d, t: RUN + [d, '--set', 'dop.beta=0.2'], ["unknown section 'dop'", 'known sections are']),
    ('set-malformed', lambda d, t: RUN + [d, '--set', 'dpo.beta'], ["must look like section.field=value"]),
    ('set-out-of-range', lambda d, t: RUN + [d, '--set', 'dpo.beta=-1'], ['dpo.beta = -1 is invalid: allowed a number > 0']),
    ('iterations-zero', lambda d, t: RUN + [d, '--iterations', '0'], ['loop.iterations = 0 is invalid']),
    # ---- config files
    ('config-wrong-type', lambda d, t: RUN + [d, '--config', write(t/'c.json', '{"sampling": {"n_responses": "five"}}')], ["sampling.n_responses = 'five' has the wrong type"]),
    ('config-not-json', lambda d, t: RUN + [d, '--config', write(t/'c.json', '{"dpo": ')], ['c.json is not valid JSON']),
    ('config-not-object', lambda d, t: RUN + [d, '--config', write(t/'c.json', '[1, 2]')], ['c.json must hold a JSON object, not list']),
    ('config-missing', lambda d, t: RUN + [d, '--config', t/'none.json'], ['none.json does not exist']),
    ('config-section-not-object', lambda d, t: RUN + [d, '--config', write(t/'c.json', '{"dpo": 0.1}')], ["section 'dpo' = 0.1 must be a JSON object"]),
    # ---- settings that do not match the run
    ('other-settings', lambda d, t: RUN + [d, '--preset', 'tiny', '--set', 'dpo.beta=0.5'], ['stage iter1/train', 'dpo.beta: 0.1 -> 0.5', '--force']),
    ('config-json-edited', lambda d, t: (write(d/'config.json', (d/'config.json').read_text().replace('"temperature": 0.8', '"temperature": 0.7')), RUN + [d])[1],
     ['stage iter1/sample', 'sampling.temperature: 0.8 -> 0.7']),
    # ---- the user's data files
    ('prompts-file-missing', lambda d, t: RUN + [d, '--prompts-file', t/'none.jsonl'], ['data.prompts_file:', 'none.jsonl does not exist']),
    ('prompts-file-bad-row', lambda d, t: RUN + [d, '--prompts-file', write(t/'p.jsonl', GOOD_PROMPT + '\n{"messages": "hi"}\n')],
     ['data.prompts_file:', 'p.jsonl line 2', "field 'messages' must be a non-empty list"]),
    ('prompts-file-not-json', lambda d, t: RUN + [d, '--prompts-file', write(t/'p.jsonl', '{"messages": [\n')], ['p.jsonl line 1 is not valid JSON']),
    ('prompts-file-csv', lambda d, t: RUN + [d, '--prompts-file', write(t/'p.csv', 'q,a\n')], ["unsupported file type '.csv'"]),
    ('seed-file-no-answer', lambda d, t: RUN + [d, '--seed-file', write(t/'s.jsonl', GOOD_PROMPT + '\n')],
     ['data.seed_file:', 's.jsonl line 1', "must end with the assistant's answer"]),
    # ---- run directories: each artifact kind cut short, emptied, deleted, invalid
    ('rewards-emptied', lambda d, t: (write(d/'iter1'/'rewards.jsonl', ''), RUN + [d])[1],
     ['stage iter1/score', 'rewards.jsonl holds 0 records for the 8 samples', 'rerun with --force to redo this stage']),
    ('samples-cut-mid-line', lambda d, t: (truncate(d/'iter1'/'samples.jsonl', 0.7), RUN + [d])[1],
     ['stage iter1/sample', 'samples.jsonl line', 'is corrupt', '--force']),
    ('samples-cut-at-line', lambda d, t: (drop_last_line(d/'iter2'/'samples.jsonl'), RUN + [d])[1],
     ['stage iter2/sample', 'samples.jsonl holds 7 records for the 8 prompts', '--force']),
    ('samples-deleted', lambda d, t: ((d/'iter1'/'samples.jsonl').unlink(), RUN + [d])[1], ['stage iter1/sample', 'samples.jsonl is missing', '--force']),
    ('logps-emptied', lambda d, t: (write(d/'iter2'/'logps_m1.jsonl', ''), RUN + [d])[1], ['stage iter2/score', 'logps_m1.jsonl holds 0 records', '--force']),
    ('consistency-invalid', lambda d, t: (write(d/'iter1'/'consistency.json', '{"set": 0.5,'), RUN + [d])[1],
     ['stage iter1/consistency', 'consistency.json is corrupt', '--force']),
    ('pairs-deleted', lambda d, t: (shutil.rmtree(d/'iter1'/'pairs'), RUN + [d])[1], ['stage iter1/pairs', 'pairs is missing', '--force']),
    ('adapter-cut-short', lambda d, t: (truncate(d/'iter2'/'model'/'adapter_model.safetensors'), RUN + [d])[1],
     ['stage iter2/train', 'adapter_model.safetensors is corrupt or cut short', '--force']),
    ('m1-weights-deleted', lambda d, t: ((d/'m1'/'adapter_model.safetensors').unlink(), RUN + [d])[1], ['stage sft', 'm1 holds no model weights', '--force']),
    ('eval-metrics-emptied', lambda d, t: (write(d/'eval_m1'/'metrics.json', ''), RUN + [d])[1], ['stage eval_m1', 'metrics.json is corrupt', '--force']),
    ('sft-metrics-deleted', lambda d, t: ((d/'sft_metrics.json').unlink(), RUN + [d])[1], ['stage sft', 'sft_metrics.json is missing', '--force']),
    ('marker-invalid', lambda d, t: (write(d/'iter1'/'_stage_sample.json', '{"stage": "iter1/sample", "finger'), RUN + [d])[1],
     ['stage iter1/sample', '_stage_sample.json is corrupt', 'rerun with --force to redo this stage']),
    ('registry-invalid', lambda d, t: (write(d/'checkpoints.json', '{"m0": '), RUN + [d])[1], ['checkpoints.json is corrupt', '--force to rebuild it']),
    ('registry-deleted', lambda d, t: ((d/'checkpoints.json').unlink(), RUN + [d])[1], ['checkpoints.json is missing', '--force to rebuild it']),
    ('run-dir-is-a-file', lambda d, t: RUN + [write(t/'afile', 'x')], ['afile is a file, not a directory']),
    ('run-dir-unwritable', lambda d, t: RUN + ['/sys/cream-sweep-run'], ['--run-dir /sys/cream-sweep-run cannot be created', 'give a directory you can write']),
    # ---- model names and paths
    ('model-path-missing', lambda d, t: RUN + [t/'fresh', '--preset', 'tiny', '--set', 'model.name=/nonexistent/model'],
     ["model.name: model path '/nonexistent/model' does not exist"]),
    ('eval-model-path-missing', lambda d, t: ['eval', '/nonexistent/model', '--limit', '1'], ["model path '/nonexistent/model' does not exist"]),
    ('eval-unknown-checkpoint', lambda d, t: ['eval', d, '--checkpoint', 'm9'], ["checkpoint 'm9' does not exist", "available ['m0', 'm1', 'm2', 'm3']"]),
    ('eval-registry-invalid', lambda d, t: (write(d/'checkpoints.json', '[]'), ['eval', d])[1], ['checkpoints.json', '--force to rebuild it']),
    # ---- CLI misuse
    ('eval-limit-zero', lambda d, t: ['eval', d, '--limit', '0'], ['--limit 0 is invalid']),
    ('status-not-a-run', lambda d, t: ['status', t/'nothing-here'], ['nothing-here is not a run directory']),
    ('too-many-prompts', lambda d, t: RUN + [t/'fresh', '--preset', 'tiny', '--set', 'data.prompts_per_iteration=100000'],
     ['the prompt pool has', '2 iterations x 100000 prompts need 200000', 'lower data.prompts_per_iteration']),
]

@pytest.mark.parametrize('case,setup,fragments', CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, setup, fragments, run_dir, tmp_path, capsys):
    argv = setup(run_dir, tmp_path)
    target = Path(argv[argv.index('--run-dir') + 1]) if '--run-dir' in argv else run_dir
    line = cream_error(capsys, argv, target)
    for f in fragments: assert f in line, (f, line)
    ARTIFACTS.mkdir(exist_ok=True)   # every case's message, for a person to read (test-artifacts/ is git-ignored)
    with open(ARTIFACTS/'sweep-messages.txt', 'a') as f: f.write(f"{case}: {line.replace(str(tmp_path), '<tmp>')}\n")

def test_at_least_30_cases(): assert len(CASES) >= 30

def test_nothing_is_written_before_sft_for_a_bad_fresh_run(tmp_path, capsys):
    "A run that cannot run leaves no config.json or checkpoints.json behind: a corrected rerun starts clean."
    for bad in (['--set', 'model.name=/nonexistent/model'], ['--set', 'data.prompts_per_iteration=100000']):
        cream_error(capsys, RUN + [tmp_path/'fresh', '--preset', 'tiny'] + bad, tmp_path/'fresh')
        assert sorted(p.name for p in (tmp_path/'fresh').iterdir()) == ['.lock']

HOLD = "import sys, time; from cream_nb.core.artifacts import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"

def test_second_writer_refused_naming_the_holder(run_dir, capsys):
    p = subprocess.Popen([sys.executable, '-c', HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])})
    try:
        assert p.stdout.readline().strip() == 'held'
        line = cream_error(capsys, RUN + [run_dir, '--set', 'dpo.beta=0.5'], run_dir)   # other settings: they cannot mix either
        assert f'is being written by pid {p.pid}' in line, line
    finally: os.killpg(p.pid, signal.SIGKILL); p.wait()

def test_the_advice_works(run_dir, capsys):
    "--force redoes an emptied rewards.jsonl (the same rewards again) and rebuilds a corrupt checkpoints.json."
    rewards, reg = (run_dir/'iter1'/'rewards.jsonl').read_bytes(), (run_dir/'checkpoints.json').read_bytes()
    write(run_dir/'iter1'/'rewards.jsonl', ''); write(run_dir/'checkpoints.json', '{"m0": ')
    assert main(RUN + [str(run_dir), '--force']) == 0, capsys.readouterr().err[-3000:]
    assert (run_dir/'iter1'/'rewards.jsonl').read_bytes() == rewards
    assert (run_dir/'checkpoints.json').read_bytes() == reg
    assert main(['eval', str(run_dir), '--limit', '1', '--tasks', 'arc_easy']) == 0   # the newest is m3, not m0
    assert 'm3' in str(sorted(p.name for p in run_dir.glob('eval_*_cli')))
