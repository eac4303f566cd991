"""Copy a finished comparison's tables into a small committed JSON that the docs page nbs/tutorials/02_comparison.ipynb plots.

    python tools/publish_compare.py runs/compare data/compare/cpu-demo.json --command "make run"

Records the command, the commit the comparison ran at (`--run-commit`, default HEAD; `tables_commit` is HEAD, whose code
computed the tables) (and whether the tree had uncommitted changes), the machine, the wall time (first stage
start to last stage end over every method's stage log) and each stage's seconds, beside compare.json's tables."""
import argparse, json, os, platform, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def _git(*a) -> str:
    return subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

def _cpu() -> dict:
    "This CPU's model name and bf16 matmul support (AVX512-BF16 / AMX), which decide what `auto` precisions pick."
    from cream_nb.models.precision import cpu_has_bf16
    name = next((l.split(':', 1)[1].strip() for l in Path('/proc/cpuinfo').read_text().splitlines() if l.startswith('model name')), platform.processor()) \
        if Path('/proc/cpuinfo').exists() else platform.processor()
    import torch
    return {'model': name, 'bf16_matmuls': cpu_has_bf16(), 'torch_threads': torch.get_num_threads()}   # bf16 samples change with both

def example_pairs(run_dir:Path, t:int=1) -> dict|None:
    "One iteration-t prompt, the one most methods paired, with each method's chosen and rejected response (or why it has none)."
    from cream_nb.reporting.tables import compare_dirs
    from cream_nb.core.artifacts import read_jsonl, load_dataset_dir
    dirs = {m: d for m, d in compare_dirs(run_dir).items() if (d/f'iter{t}'/'pairs').exists()}
    if not dirs: return None
    pairs = {m: {r['prompt_id']: r for r in load_dataset_dir(d/f'iter{t}'/'pairs').to_list()} for m, d in dirs.items()}
    prompts = {p['id']: p for d in dirs.values() for p in read_jsonl(d/f'iter{t}'/'prompts.jsonl')}
    shared = [p for p in prompts if all(p in {q['id'] for q in read_jsonl(d/f'iter{t}'/'prompts.jsonl')} for d in dirs.values())]
    if not shared: return None
    pid = max(shared, key=lambda p: (sum(p in v for v in pairs.values()), prompts[p]['task'] != 'oasst1', p))
    out = {'iteration': t, 'prompt_id': pid, 'task': prompts[pid]['task'], 'answer': prompts[pid].get('answer'),
           'prompt': prompts[pid]['messages'][-1]['content'], 'methods': {}}
    for m, d in dirs.items():
        r = pairs[m].get(pid)
        if r is None:
            why = next((x.get('skip') for x in read_jsonl(d/f'iter{t}'/'rewards.jsonl') if x['prompt_id'] == pid), None)
            out['methods'][m] = {'pair': None, 'why': why or 'no pair (equal or missing rewards)'}
        else:
            out['methods'][m] = {'pair': {k: r[k] for k in ('chosen', 'rejected', 'chosen_index', 'rejected_index', 'chosen_reward', 'rejected_reward')
                                          } | ({'weight': r['weight']} if 'weight' in r else {})}
    return out

def publish(run_dir:Path, out:Path, command:str, run_commit:str|None=None, example:bool=False) -> dict:
    from cream_nb.reporting.tables import compare_dirs, write_tables
    from cream_nb.runs.stage import StageLog
    tab = write_tables(run_dir)
    events = [e for d in compare_dirs(run_dir).values() for e in StageLog(d/'stages.jsonl').events()]
    if not events: raise SystemExit(f"{run_dir}: no stage log; run the comparison first")
    stages = {}
    for m, d in compare_dirs(run_dir).items():
        for e in StageLog(d/'stages.jsonl').events():
            if e['event'] == 'done': stages.setdefault(m, {})[e['stage']] = round(e['seconds'], 1)
            if e['event'] == 'shared': stages.setdefault(m, {})[e['stage']] = 'shared'
    cfg = json.loads((run_dir/'compare_config.json').read_text()) if (run_dir/'compare_config.json').exists() else {}
    head = _git('rev-parse', 'HEAD')
    rec = {'preset': cfg.get('preset'), 'command': command, 'commit': _git('rev-parse', run_commit) if run_commit else head,
           'tables_commit': head,
           'uncommitted_changes': bool(_git('status', '--porcelain', '--untracked-files=no')),
           'made': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(max(e['time'] for e in events))),
           'machine': f"{platform.machine()}, {os.cpu_count()} CPUs visible, torch threads from OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
           'cpu': _cpu(),   # the model and whether it has bf16 matmuls: sampling.engine_dtype='auto' generates in bf16 only where it does
           'wall_seconds': round(max(e['time'] for e in events) - min(e['time'] for e in events)),
           'stage_seconds': stages, 'config': cfg, 'tables': tab, **({'example': example_pairs(run_dir)} if example else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1, sort_keys=False) + "\n")
    return rec

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('run_dir', type=Path); p.add_argument('out', type=Path)
    p.add_argument('--command', default='make run', help="the command that made the comparison")
    p.add_argument('--run-commit', default=None, help="the commit the comparison ran at, when the tables are computed at a later one (default: HEAD)")
    p.add_argument('--example', action='store_true', help="also keep one iteration-1 prompt with each method's chosen and rejected response")
    a = p.parse_args()
    r = publish(a.run_dir, a.out, a.command, a.run_commit, a.example)
    print(f"{a.out}: {r['preset']} comparison of {', '.join(r['tables']['methods'])}, {r['wall_seconds']} s, commit {r['commit'][:10]}"
          f"{' (with uncommitted changes)' if r['uncommitted_changes'] else ''}; {a.out.stat().st_size // 1024} KB")
