"""Where a cpu-demo run's memory goes: the peak RSS of each stage, and SFT's peak at two batch layouts.

    .venv/bin/python bench/memory.py                  # both parts (about 3 minutes on 2 cores)
    .venv/bin/python bench/memory.py --part stages    # one process runs SFT, M1's evaluation and iteration 1 of CREAM

`stages`: one process runs the stages of a cpu-demo CREAM run in order; before each stage the kernel's peak RSS
counter (VmHWM) is reset (`/proc/self/clear_refs`, 5), so each line gives that stage's own peak, then the RSS the
process holds after it, and after `malloc_trim` (what glibc keeps of freed memory).
`sft`: SFT alone in a fresh process per layout, the same 8 examples per optimizer step either as one batch of 8 or
as 4 accumulated slices of 2 (`sft.batch_size=2, sft.grad_accum=4`, the cpu-demo preset since this bench): seconds,
peak RSS, and the losses (the two layouts compute the same mean loss, up to float rounding)."""
import argparse, ctypes, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status() -> dict:
    return {k: int(v.split()[0]) / 1e6 for k, v in (l.split(':', 1) for l in open('/proc/self/status')) if k in ('VmRSS', 'VmHWM')}


def _reset_peak():
    with open('/proc/self/clear_refs', 'w') as f: f.write('5')   # VmHWM := VmRSS


def stages(overrides:list) -> list:
    from cream_nb.runs.run import CreamRun
    from cream_nb.core.config import preset, apply_overrides
    d = Path(tempfile.mkdtemp())/'run'
    run = CreamRun(apply_overrides(preset('cpu-demo'), overrides), d, progress=False)
    run._lock_or_refuse(); run.check()
    it = run.iteration(1)
    rows, trim = [], ctypes.CDLL('libc.so.6').malloc_trim
    for name, f in [('load data and M0', lambda: (run.seed_records(), run.prompt_subsets(), run.base)), ('sft', run.sft),
                    ('evaluate m1', run.evaluate_m1), ('sample', it.sample), ('score (log-probs of m1, m0)', it.score),
                    ('consistency + pairs', lambda: (it.consistency(), it.pairs())), ('train (DPO)', it.train), ('evaluate m2', it.evaluate)]:
        _reset_peak(); t = time.perf_counter(); f(); t = time.perf_counter() - t
        s = _status(); trim(0)
        rows.append({'stage': name, 'seconds': round(t, 1), 'peak_gb': s['VmHWM'], 'after_gb': s['VmRSS'], 'after_trim_gb': _status()['VmRSS']})
    run.lock.release(); shutil.rmtree(d.parent, ignore_errors=True)
    return rows


def sft_once(overrides:list) -> dict:
    from cream_nb.runs.run import CreamRun
    from cream_nb.core.config import preset, apply_overrides
    d = Path(tempfile.mkdtemp())/'run'
    run = CreamRun(apply_overrides(preset('cpu-demo'), overrides), d, progress=False)
    run._lock_or_refuse(); run.check(); run.seed_records(); run.base
    _reset_peak(); t = time.perf_counter(); m = run.sft(); t = time.perf_counter() - t
    run.lock.release(); shutil.rmtree(d.parent, ignore_errors=True)
    return {'overrides': overrides, 'seconds': round(t, 1), 'peak_gb': _status()['VmHWM'], 'steps': m['steps'],
            'losses': [h['loss'] for h in m['history'] if 'loss' in h]}


def _child(what:str, overrides:list):
    out = subprocess.run([sys.executable, __file__, '--child', what, *overrides], capture_output=True, text=True, cwd=ROOT)
    if out.returncode: raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--part', choices=['stages', 'sft', 'both'], default='both')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)
    a, rest = p.parse_known_args()
    if a.child: print(json.dumps(stages(rest) if a.child == 'stages' else sft_once(rest))); sys.exit(0)
    if a.part in ('stages', 'both'):
        print("Peak RSS per stage of a cpu-demo CREAM run (one process; VmHWM reset before each stage), GB")
        print(f"{'stage':30s} {'seconds':>8s} {'peak':>6s} {'after':>6s} {'trimmed':>8s}")
        for r in _child('stages', []):
            print(f"{r['stage']:30s} {r['seconds']:8.1f} {r['peak_gb']:6.2f} {r['after_gb']:6.2f} {r['after_trim_gb']:8.2f}")
    if a.part in ('sft', 'both'):
        print("\nSFT, 8 examples per step: one batch of 8 against 4 accumulated slices of 2 (fresh process each)")
        rows = [_child('sft', ['sft.batch_size=8', 'sft.grad_accum=1']), _child('sft', ['sft.batch_size=2', 'sft.grad_accum=4'])]
        for r in rows:
            print(f"{' '.join(r['overrides']):40s} {r['seconds']:6.1f} s  peak {r['peak_gb']:5.2f} GB  losses {', '.join(f'{x:.5f}' for x in r['losses'])}")
        print(f"peak {rows[0]['peak_gb'] / rows[1]['peak_gb']:.2f}x lower, time ratio {rows[1]['seconds'] / rows[0]['seconds']:.2f}, "
              f"largest loss difference {max(abs(x - y) for x, y in zip(rows[0]['losses'], rows[1]['losses'])):.2e}")
