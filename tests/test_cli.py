"""`cream` from a shell: every sub-command run as a subprocess on the `tiny` preset, what it prints and writes,
and its errors: exit codes and the one line each error prints.

Only the console script is called (never `cream_nb` itself), so these tests hold whatever the modules are named.
Each `cream` process spends seconds importing, so the slow ones overlap: the module fixture `jobs` starts one
`cream run` and one `cream compare` in the background, and the quick error cases run (3 at a time) while they work."""
import json, os, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

CREAM = str(Path(sys.executable).parent/'cream')   # the console script installed next to this interpreter
# one OpenMP thread per process: several cream processes share the cores, and spinning OpenMP threads then cost
# a tiny run 2.5x its CPU time (measured: 86 s -> 33 s of CPU on a loaded 2-core machine)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
TIMEOUT = 900
# the tiny preset, smaller still: 1 question of 2 tasks per evaluation, one task's training questions in the prompt pool
CHEAP = ['--quiet', '--set', 'eval.limit=1', '--set', 'eval.tasks=["arc_easy","gsm8k"]', '--set', 'data.tasks=["arc_easy"]']
SEEDS_ARGS = ['--methods', 'm1', 'dpo', 'cream-avg', '--iterations', '1', *CHEAP]
STAGES = ('sample', 'score', 'consistency', 'pairs', 'train', 'evaluate')
# bitsandbytes logs this on import when the CPU has avx512-bf16 and the `kernels` package is missing: not cream's output
FOREIGN = ('Failed to load CPU gemm_4bit_forward from kernels-community',)


def cream(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([CREAM, *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT, cwd=cwd, env=ENV)


class Job:
    "A `cream` process in the background, its output going to files (no pipe to fill up)."
    def __init__(self, args, logs:Path, name:str):
        self.out, self.err = logs/f'{name}.out', logs/f'{name}.err'
        with open(self.out, 'w') as o, open(self.err, 'w') as e:
            self.p = subprocess.Popen([CREAM, *map(str, args)], stdout=o, stderr=e, text=True, env=ENV)
    def running(self) -> bool: return self.p.poll() is None
    def result(self) -> subprocess.CompletedProcess:
        rc = self.p.wait(timeout=TIMEOUT)
        return subprocess.CompletedProcess(self.p.args, rc, self.out.read_text(), self.err.read_text())
    def stop(self):
        if self.running(): self.p.kill(); self.p.wait()


def own_lines(stderr:str) -> list:
    "The non-empty lines of stderr that cream wrote."
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith(FOREIGN)]


def one_line_error(r:subprocess.CompletedProcess, *words, stdout='') -> str:
    "Exit code 2, `stdout` on stdout, and exactly one line on stderr: 'cream: error: ...' holding every one of `words`."
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = own_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith('cream: error: '), r.stderr[-3000:]
    assert r.stdout == stdout
    for w in words: assert w in lines[0], (w, lines[0])
    return lines[0]


def usage_error(r:subprocess.CompletedProcess, prog:str, *words) -> str:
    "argparse's refusal: exit code 2, the usage of `prog`, then one last line '<prog>: error: ...' holding `words`."
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = own_lines(r.stderr)
    assert lines[0].startswith(f'usage: {prog} ') and lines[-1].startswith(f'{prog}: error: '), r.stderr[-3000:]
    assert 'Traceback' not in r.stderr and r.stdout == ''
    for w in words: assert w in lines[-1], (w, lines[-1])
    return lines[-1]


# ---------------------------------------------------------------- the slow commands, in the background

@pytest.fixture(scope='module')
def jobs(tmp_path_factory):
    """A tiny 2-iteration `cream run` and a tiny `cream compare` of m1 and dpo (1 iteration), both started at once.
    While the run holds its lock, a second `cream run` on the same directory and a `cream status` of it are made."""
    root = tmp_path_factory.mktemp('cli')
    run_dir, cmp_dir = root/'run', root/'cmp'
    run_args = ['run', '--preset', 'tiny', '--run-dir', run_dir, *CHEAP]
    run = Job(run_args, root, 'run')
    comparison = Job(['compare', '--preset', 'tiny', '--run-dir', cmp_dir, '--methods', 'm1', 'dpo', '--iterations', '1',
                      '--reference', 'dpo', *CHEAP], root, 'compare')
    seeds = Job(['compare', '--preset', 'tiny', '--run-dir', root/'seeds', '--seeds', '0,', *SEEDS_ARGS], root, 'seeds')   # seed 0 alone
    try:
        deadline = time.time() + TIMEOUT
        begun = lambda: (run_dir/'.lock.json').exists() and (run_dir/'config.json').exists()
        while not begun() and run.running() and time.time() < deadline: time.sleep(0.05)
        locked = run.running() and begun()
        second = reader = None
        if locked:
            with ThreadPoolExecutor(2) as pool:   # a writer and a reader of the run directory being written
                second, reader = pool.submit(cream, *run_args), pool.submit(cream, 'status', run_dir)
                second, reader = second.result(), reader.result()
        yield SimpleNamespace(root=root, run_dir=run_dir, cmp_dir=cmp_dir, run=run, compare=comparison, locked=locked,
                              held_to_the_end=run.running(), second=second, reader=reader, seeds=seeds)
    finally:
        run.stop(); comparison.stop(); seeds.stop()


@pytest.fixture(scope='module')
def tiny_run(jobs):
    "(run_dir, the finished `cream run`)"
    r = jobs.run.result()
    assert r.returncode == 0, r.stderr[-3000:]
    return jobs.run_dir, r


@pytest.fixture(scope='module')
def comparison(jobs):
    "(comparison dir, the finished `cream compare`)"
    r = jobs.compare.result()
    assert r.returncode == 0, r.stderr[-3000:]
    return jobs.cmp_dir, r


# ---------------------------------------------------------------- the quick commands: help, config and errors

def quick_cases(root:Path) -> dict:
    (root/'a-file').write_text('not a directory')
    d = lambda name: root/name   # a run directory that must not be created
    return {
        'help': ['--help'],
        'no_command': [],
        'config': ['config', '--preset', 'tiny'],
        'unknown_preset': ['run', '--preset', 'huge', '--run-dir', d('unknown_preset')],
        'unknown_compare_method': ['compare', '--preset', 'tiny', '--methods', 'm1', 'ppo', '--run-dir', d('unknown_compare_method')],
        'unknown_field': ['run', '--preset', 'tiny', '--run-dir', d('unknown_field'), '--set', 'dpo.betta=1'],
        'wrong_type': ['run', '--preset', 'tiny', '--run-dir', d('wrong_type'), '--set', 'dpo.beta=abc'],
        'invalid_value': ['run', '--preset', 'tiny', '--run-dir', d('invalid_value'), '--set', 'sampling.n_responses=1'],
        'no_equals': ['run', '--preset', 'tiny', '--run-dir', d('no_equals'), '--set', 'dpo.beta'],
        'run_dir_is_a_file': ['run', '--preset', 'tiny', '--run-dir', root/'a-file'],
        'status_no_run': ['status', d('status_no_run')],
        'report_no_run': ['report', d('report_no_run')],
        'eval_limit_0': ['eval', 'tiny', '--limit', '0'],
        'repeated_seed': ['compare', '--preset', 'tiny', '--seeds', '0,1,0', '--run-dir', d('repeated_seed')],
        'no_seed': ['compare', '--preset', 'tiny', '--seeds', '0', '--run-dir', d('no_seed')],
    }


@pytest.fixture(scope='module')
def quick(jobs):
    "{case: CompletedProcess} of every quick case, 3 at a time, while `jobs` runs (requested for that reason)."
    root = jobs.root/'quick'; root.mkdir()
    cases = quick_cases(root)
    with ThreadPoolExecutor(3) as pool:
        futures = {k: pool.submit(cream, *args, cwd=root) for k, args in cases.items()}
        return SimpleNamespace(root=root, r={k: f.result() for k, f in futures.items()})


def test_help_exits_0_and_lists_every_subcommand(quick):
    r = quick.r['help']
    assert r.returncode == 0 and r.stdout.startswith('usage: cream '), r.stderr[-3000:]
    assert '{run,eval,status,report,config,compare}' in r.stdout
    assert own_lines(r.stderr) == []


def test_no_subcommand_is_a_usage_error(quick):
    usage_error(quick.r['no_command'], 'cream', 'the following arguments are required: command')


def test_config_prints_the_resolved_preset(quick):
    r = quick.r['config']
    assert r.returncode == 0 and own_lines(r.stderr) == [], r.stderr[-3000:]
    lines = r.stdout.splitlines()
    for want in ("model.name = 'tiny'", 'loop.iterations = 2', 'eval.limit = 3', 'sampling.n_responses = 4', "loop.method = 'cream'"):
        assert any(l.startswith(want + '  # ') for l in lines), want   # each field with its help after '#'
    assert all(' = ' in l and '  # ' in l for l in lines if l.strip())


@pytest.mark.parametrize('case, prog, words', [
    ('unknown_preset', 'cream run', ["argument --preset: invalid choice: 'huge'", "'tiny'"]),
    ('unknown_compare_method', 'cream compare', ["argument --methods: invalid choice: 'ppo'", "'cream-avg'"]),
])
def test_unknown_choice_is_a_usage_error(quick, case, prog, words):
    usage_error(quick.r[case], prog, *words)
    assert not (quick.root/case).exists()


@pytest.mark.parametrize('case, words', [
    ('unknown_field', ["unknown field 'betta'", "'dpo.betta=1'", "'beta'"]),
    ('wrong_type', ["dpo.beta = 'abc' has the wrong type", 'expected a number']),
    ('invalid_value', ['sampling.n_responses = 1 is invalid']),
    ('no_equals', ["override 'dpo.beta' must look like section.field=value"]),
])
def test_bad_set_is_one_line_before_anything_runs(quick, case, words):
    one_line_error(quick.r[case], *words)
    assert not (quick.root/case).exists()   # refused before the run directory is made


def test_run_dir_that_is_a_file(quick):
    one_line_error(quick.r['run_dir_is_a_file'], 'a-file is a file, not a directory')
    assert (quick.root/'a-file').read_text() == 'not a directory'


@pytest.mark.parametrize('case', ['status_no_run', 'report_no_run'])
def test_status_and_report_of_a_missing_run_dir(quick, case):
    one_line_error(quick.r[case], f'{quick.root/case} is not a run directory (it has no config.json)')
    assert not (quick.root/case).exists()


@pytest.mark.parametrize('case, words', [('repeated_seed', ["--seeds '0,1,0': seed 0 is repeated"]), ('no_seed', ["--seeds '0' asks for no seed"])])
def test_bad_seed_list_is_one_line_before_anything_runs(quick, case, words):
    one_line_error(quick.r[case], *words)
    assert not (quick.root/case).exists()


def test_eval_limit_must_be_positive(quick):
    one_line_error(quick.r['eval_limit_0'], '--limit 0 is invalid')


# ---------------------------------------------------------------- cream run, and what reads its directory

def test_second_writer_is_refused_while_the_lock_is_held(jobs):
    assert jobs.locked, "the first run ended before it took its lock"
    assert jobs.held_to_the_end, "the first run ended before the second one asked for the lock: nothing was tested"
    one_line_error(jobs.second, f'{jobs.run_dir} is being written by pid {jobs.run.p.pid} ', 'wait for it to finish',
                   stdout=f'cream: CreamRun(tiny config, method=cream, run_dir={jobs.run_dir})\n')   # refused before any stage
    # a reader needs no lock: `cream status` of the directory being written works
    assert jobs.reader.returncode == 0, jobs.reader.stderr[-3000:]
    assert jobs.reader.stdout.startswith(f'run {jobs.run_dir}  preset=tiny  method=cream  iterations planned=2\n')


def test_run_writes_its_artifacts(tiny_run):
    d, r = tiny_run
    for f in ('config.json', 'summary.json', 'checkpoints.json', 'stages.jsonl', 'm1', 'eval_m1/metrics.json',
              'iter1/samples.jsonl', 'iter1/rewards.jsonl', 'iter1/eval/metrics.json', 'iter2/eval/metrics.json'):
        assert (d/f).exists(), f
    assert not (d/'.lock.json').exists()   # the lock is given back
    cfg = json.loads((d/'config.json').read_text())
    assert cfg['eval']['limit'] == 1 and cfg['eval']['tasks'] == ['arc_easy', 'gsm8k'] and cfg['data']['tasks'] == ['arc_easy']
    s = json.loads((d/'summary.json').read_text())
    assert (s['preset'], s['method'], s['iterations_planned']) == ('tiny', 'cream', 2)
    assert [it['iteration'] for it in s['iterations']] == [1, 2]
    assert all(it['done'] == list(STAGES) for it in s['iterations'])
    assert s['m1_eval']['n'] == {'arc_easy': 1, 'gsm8k': 1} and all(it['eval']['n'] == {'arc_easy': 1, 'gsm8k': 1} for it in s['iterations'])
    assert list(json.loads((d/'checkpoints.json').read_text())) == ['m0', 'm1', 'm2', 'm3']
    # stdout: what runs, then the end line and the one-screen table
    assert r.stdout.startswith('cream: CreamRun(tiny config, method=cream, '), r.stdout
    assert f'; artifacts in {d}; summary.json written' in r.stdout
    rows = [l for l in r.stdout.splitlines() if l.startswith(('m1 (SFT) ', 'm2 (iter 1) ', 'm3 (iter 2) '))]
    assert [l.split(')')[0] for l in rows] == ['m1 (SFT', 'm2 (iter 1', 'm3 (iter 2'], r.stdout
    assert 'arc_easy (n=1)' in r.stdout and 'gsm8k (n=1)' in r.stdout
    assert 'Traceback' not in r.stderr


def test_rerun_of_a_finished_run_does_nothing(tiny_run):
    d, _ = tiny_run
    before = (d/'stages.jsonl').read_text()
    r = cream('run', '--run-dir', d, '--quiet')   # no --preset: the run's own config.json
    assert r.returncode == 0, r.stderr[-3000:]
    new = [json.loads(l) for l in (d/'stages.jsonl').read_text()[len(before):].splitlines()]
    assert new and {e['event'] for e in new} == {'skip'}, new
    assert {'sft', 'eval_m1', 'iter2/train'} <= {e['stage'] for e in new}


def test_status_names_every_stage_and_iteration(tiny_run):
    d, _ = tiny_run
    r = cream('status', d)
    assert r.returncode == 0 and own_lines(r.stderr) == [], r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == f'run {d}  preset=tiny  method=cream  iterations planned=2'
    assert lines[1].startswith('  sft: done in ') and lines[1].endswith(' s')
    for i in (1, 2):
        line = next(l for l in lines if l.startswith(f'  iter{i}: '))
        assert [w.split('(')[0] for w in line.split(': ', 1)[1].split()] == list(STAGES), line   # each with its seconds
    assert sum(l.startswith(('m1 (SFT)', 'm2 (iter 1)', 'm3 (iter 2)')) for l in lines) == 3


def test_report_writes_one_html_file(tiny_run, tmp_path):
    d, _ = tiny_run
    out = tmp_path/'new'/'report.html'   # a folder that does not exist yet
    r = cream('report', d, '-o', out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == f'report written to {out}'
    html = out.read_text()
    assert html.lstrip().lower().startswith('<!doctype html') and html.rstrip().endswith('</html>')
    assert 'plotly' in html and '<script src="http' not in html   # self-contained: plotly inlined, nothing fetched
    assert not (d/'report.html').exists()


def test_eval_of_the_newest_checkpoint(tiny_run):
    d, _ = tiny_run
    r = cream('eval', d, '--limit', '1', '--tasks', 'arc_easy')
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert set(res) == {'accuracy', 'average', 'n'} and res['n'] == {'arc_easy': 1}
    assert res['accuracy']['arc_easy'] in (0.0, 1.0) and res['average'] == res['accuracy']['arc_easy']
    out = d/'eval_m3_cli'   # the newest checkpoint: m3
    m = json.loads((out/'metrics.json').read_text())
    assert m['n'] == {'arc_easy': 1} and m['accuracy'] == res['accuracy']
    preds = [json.loads(l) for l in (out/'predictions.jsonl').read_text().splitlines()]
    assert [p['task'] for p in preds] == ['arc_easy']


def test_eval_of_m1_matches_the_runs_own_evaluation(tiny_run, tmp_path):
    d, _ = tiny_run
    r = cream('eval', d, '--checkpoint', 'm1', '--limit', '1', '--tasks', 'arc_easy', '--out', tmp_path/'ev')
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)['n'] == {'arc_easy': 1}
    got = [json.loads(l) for l in (tmp_path/'ev'/'predictions.jsonl').read_text().splitlines()]
    run = [json.loads(l) for l in (d/'eval_m1'/'predictions.jsonl').read_text().splitlines()]
    pick = lambda rows: [(p['id'], p['correct']) for p in rows if p['task'] == 'arc_easy']
    assert len(got) == 1 and pick(got) == pick(run)   # the same question, answered the same way
    assert not (d/'eval_m1_cli').exists()


def test_eval_of_a_missing_checkpoint(tiny_run):
    d, _ = tiny_run
    one_line_error(cream('eval', d, '--checkpoint', 'm9', '--limit', '1'), "checkpoint 'm9' does not exist", "['m0', 'm1', 'm2', 'm3']")


# ---------------------------------------------------------------- cream compare

def test_compare_runs_each_method_and_writes_tables_and_report(comparison):
    d, r = comparison
    assert r.stdout.startswith(f'cream: comparing m1, dpo on the tiny config in {d}'), r.stdout
    assert r.stdout.rstrip().endswith(f'report: {d/"report.html"}')
    assert 'vs dpo' in r.stdout and 'McNemar' in r.stdout
    tab = json.loads((d/'compare.json').read_text())
    assert tab['methods'] == ['m1', 'dpo'] and tab['reference'] == 'dpo'
    assert json.loads((d/'compare_config.json').read_text())['loop']['iterations'] == 1
    s = {m: json.loads((d/m/'summary.json').read_text()) for m in ('m1', 'dpo')}
    assert [it['iteration'] for it in s['m1']['iterations']] == [] and [it['iteration'] for it in s['dpo']['iterations']] == [1]
    assert s['dpo']['method'] == 'dpo' and s['dpo']['iterations'][0]['done'] == list(STAGES)
    assert s['m1']['m1_eval']['n'] == s['dpo']['m1_eval']['n'] == {'arc_easy': 1, 'gsm8k': 1}
    html = (d/'report.html').read_text()
    assert html.lstrip().lower().startswith('<!doctype html') and 'plotly' in html


def test_status_of_a_compared_method_and_of_the_comparison(comparison):
    d, _ = comparison
    r = cream('status', d/'dpo')   # each method's directory is a normal run
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == f'run {d/"dpo"}  preset=tiny  method=dpo  iterations planned=1'
    assert any(l.startswith('  iter1: sample(') for l in lines) and not any(l.startswith('  iter2') for l in lines)
    one_line_error(cream('status', d), f'{d} is a comparison, not one run: `cream status {d}/<method>` for one of its methods (m1, dpo)')


def test_seeds_run_each_seed_and_adding_one_reuses_the_finished(jobs):
    "`--seeds 0,` ran in the background; `--seeds 2` (0 and 1) redoes nothing of seed 0 and tabulates both seeds."
    first = jobs.seeds.result()
    assert first.returncode == 0, first.stderr[-3000:]
    d = jobs.root/'seeds'
    assert 'Across 1 seeds (0)' in first.stdout
    before = {m: len((d/'seed-0'/m/'stages.jsonl').read_text().splitlines()) for m in ('m1', 'dpo', 'cream-avg')}
    r = cream('compare', '--run-dir', d, '--seeds', '2', *SEEDS_ARGS)   # the config comes from the first command's compare_config.json
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(f'cream: comparing m1, dpo, cream-avg on the tiny config on seeds 0, 1 in {d}'), r.stdout[:300]
    for m, n in before.items():   # seed 0: every stage of the second command was a skip
        new = [json.loads(l) for l in (d/'seed-0'/m/'stages.jsonl').read_text().splitlines()[n:]]
        assert new and {e['event'] for e in new} == {'skip'}, (m, new)
    events = [json.loads(l) for l in (d/'seed-1'/'dpo'/'stages.jsonl').read_text().splitlines()]
    assert {e['stage'] for e in events if e['event'] in ('done', 'shared')} >= {'sft', 'iter1/sample', 'iter1/train'}
    cfgs = {s: json.loads((d/f'seed-{s}'/'dpo'/'config.json').read_text()) for s in (0, 1)}
    assert [(c['loop']['seed'], c['sampling']['seed']) for c in cfgs.values()] == [(0, 0), (1, 1)]
    assert cfgs[0]['data'] == cfgs[1]['data']   # the same prompts and questions
    samples = {s: (d/f'seed-{s}'/'dpo'/'iter1'/'samples.jsonl').read_text() for s in (0, 1)}
    assert samples[0] != samples[1]
    tab = json.loads((d/'seeds.json').read_text())
    assert tab['seeds'] == [0, 1] and tab['reference'] == 'cream-avg'
    acc = {(r_['figure'], r_['method']): r_ for r_ in tab['rows']}
    per = {s: json.loads((d/f'seed-{s}'/'compare.json').read_text()) for s in (0, 1)}
    for s in (0, 1):   # the seeds table holds each seed's own pooled accuracy
        c = per[s]['accuracy']['dpo']['m2']['average']
        assert acc[('accuracy', 'dpo')]['seeds'][str(s)]['value'] == pytest.approx(c['correct'] / c['n'])
    assert 'Across 2 seeds (0, 1)' in r.stdout and r.stdout.rstrip().endswith(f'cream report {d}/seed-<s>')
    page = (d/'report.html').read_text()   # the seeds page: the table with its tests over seeds, and the figure
    assert f'report: {d/"report.html"}' in r.stdout and 'p over seeds' in page and 'Every seed and the mean' in page
    (d/'report.html').unlink()
    rep = cream('report', d)   # `cream report` takes the seeds directory too
    assert rep.returncode == 0 and (d/'report.html').exists(), rep.stderr[-2000:]
    one_line_error(cream('status', d), f'{d} holds a comparison on several seeds: give one of its seed directories, e.g. {d}/seed-0')
