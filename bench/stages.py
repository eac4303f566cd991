"""Stage times of a cpu-demo comparison at an earlier commit and at this one, side by side in one run (issue 20, item 4).

    .venv/bin/python bench/stages.py                                   # base 57c7bc8 (before this round's speed work) vs the work tree
    .venv/bin/python bench/stages.py --base HEAD~3 --methods m1 dpo cream-avg
    .venv/bin/python bench/stages.py --base 57c7bc8 --set eval.limit=10   # --set goes to both commits: fields both know

What it does, in one process, alone on the machine (several torch processes on 2 cores slow each other far more than 2x):
1. the machine's matmul peaks, fp32 and bf16: a 2048^3 product, and a product of this model's own shape (784 tokens x 576
   hidden x 1536, the MLP's up projection at reward.batch_size 16 x 49 tokens), before and after the two runs;
2. `cream compare --preset PRESET --methods ... --quiet` from a checkout of --base (a `git worktree`, removed at the end),
   then the same from the work tree, each in a fresh child process: wall time and the child's own peak RSS (`os.wait4`);
3. from each run's stages.jsonl: seconds per stage kind, each stage's own time (a score stage's nested log-prob stages
   are counted as logps, not twice); 'outside stages' is the rest of the wall time (process start, model loading,
   the comparison's own analysis);
4. the useful FLOPs of each kind, counted from the run's artifacts with this commit's tokenizer, and the achieved GFLOP/s.

FLOP convention (useful work, not what a kernel does): N = the parameters of the model's linear layers (lm_head included,
135M for SmolLM2-135M); a forward costs 2N per token that is needed once (a prompt counted once even where a commit
computes it N times, so wasted work shows as lower GFLOP/s), LoRA training 4N per token (forward, and backward to the
inputs; the frozen weights get no gradient); attention's own products are left out (under 10% at these lengths).
  sft       every trained token (TRL's num_tokens) x 4N
  sample    each prompt once + every generated token, x 2N (the hf engine generates in bf16 where the CPU has bf16)
  logps     each prompt once + every response token (and its end token), x 2N per scored model
  score     the method's own reward work beyond log-probs (SRLM's judge): not counted, time only
  train     every pair's prompt + chosen + prompt + rejected tokens x 4N x epochs
  evaluate  multiple choice: each question once + every option; GSM8K: its prompt once + the generated answer; x 2N
The normalised wall time scales this run's wall time to a machine whose fp32 peak is 203 GFLOP/s (the issue's machine):
wall x peak_here / 203."""
from __future__ import annotations
import argparse, json, os, shutil, subprocess, sys, tempfile, time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF_PEAK = 203.0   # GFLOP/s fp32 of the machine the 6-minute goal is stated for
KINDS = ['sft', 'sample', 'logps', 'score', 'train', 'evaluate', 'other stages', 'outside stages']


def peaks() -> dict:
    "GFLOP/s of fp32 and bf16 products: a square 2048^3 one and one of the model's own shape (best of 4)."
    import torch
    def gf(a, b, reps=4):
        best = float('inf')
        for _ in range(reps + 1):
            t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
        return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e9
    out = {}
    for name, dt in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
        out[name] = gf(torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt))
        out[f'{name} model shape'] = gf(torch.randn(784, 576, dtype=dt), torch.randn(576, 1536, dtype=dt), reps=20)
    return out


def run_compare(src:Path, out:Path, preset:str, methods:list, sets:list) -> dict:
    "`cream compare` from the checkout `src` in a child process: wall seconds, the child's peak RSS (GB), its exit code."
    code = "import sys; from cream_nb.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, '-c', code, 'compare', '--preset', preset, '--run-dir', str(out), '--quiet', '--methods', *methods]
    for s in sets: cmd += ['--set', s]
    env = dict(os.environ, PYTHONPATH=str(src))
    log = open(out.parent/f'{out.name}.log', 'w')
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.time() - t0
    rc = os.waitstatus_to_exitcode(status)
    return dict(wall=wall, rss_gb=ru.ru_maxrss / 1e6, rc=rc, log=log.name)


def kind_of(stage:str) -> str:
    last = stage.split('/')[-1]
    if last == 'sft': return 'sft'
    if last in ('eval_m1', 'evaluate'): return 'evaluate'
    if last.startswith('logps_'): return 'logps'
    if last in ('sample', 'score', 'train'): return last
    return 'other stages'


def stage_seconds(run_dir:Path) -> dict:
    "kind -> seconds of the stages this run computed (each stage's own time: nested stages are subtracted from their parent)."
    out = defaultdict(float)
    for f in sorted(run_dir.glob('*/stages.jsonl')):
        done = []
        for line in open(f):
            r = json.loads(line)
            if r.get('event') == 'done' and r.get('seconds') is not None:
                done.append((r['stage'], r['time'] - r['seconds'], r['time'], r['seconds']))
        for st, a, b, s in done:
            inner = sum(s2 for st2, a2, b2, s2 in done if st2 != st and a <= a2 and b2 <= b)
            out[kind_of(st)] += s - inner
    return dict(out)


class Counter:
    "Useful FLOPs of a finished comparison, counted from its artifacts (see the module's docstring)."
    def __init__(self, cfg):
        import torch
        from cream_nb.models.loading import load_model
        from cream_nb.data.sources import load_test_set
        model, self.tok = load_model(cfg.model)
        self.questions = {r['id']: r for t in cfg.eval.tasks for r in load_test_set(t, source='offline', limit=cfg.eval.limit)}
        self.n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        del model
        self.cache = {}

    def ntok(self, text:str) -> int:
        if text not in self.cache: self.cache[text] = len(self.tok(text, add_special_tokens=False)['input_ids'])
        return self.cache[text]

    def prompt(self, messages) -> int:
        from cream_nb.models.engine import chat_prompt_ids
        key = json.dumps(messages)
        if key not in self.cache: self.cache[key] = len(chat_prompt_ids(self.tok, messages))
        return self.cache[key]

    def iteration(self, d:Path) -> dict:
        "FLOPs of one iteration directory: sample, logps (per scored model), train."
        from cream_nb.core.artifacts import read_jsonl
        prompts = {p['id']: p for p in read_jsonl(d/'prompts.jsonl')}
        samples = read_jsonl(d/'samples.jsonl')
        ptok = sum(self.prompt(prompts[s['prompt_id']]['messages']) for s in samples)
        rtok = sum(self.ntok(r) + 1 for s in samples for r in s['responses'])
        out = {'sample': 2 * self.n * (ptok + rtok), 'logps': 2 * self.n * (ptok + rtok) * len(list(d.glob('logps_*.jsonl')))}
        if (d/'pairs').exists():
            import datasets
            ds = datasets.load_from_disk(str(d/'pairs'))
            toks = sum(2 * self.prompt(r['prompt']) + self.ntok(r['chosen']) + self.ntok(r['rejected']) + 2 for r in ds)
            out['train'] = 4 * self.n * toks
        return out

    def evaluation(self, d:Path) -> float:
        "FLOPs of one evaluation directory (predictions.jsonl): each question once, its options or its generated answer."
        from cream_nb.core.artifacts import read_jsonl
        tok = 0
        for r in read_jsonl(d/'predictions.jsonl'):
            rec = self.questions[r['id']]
            if r.get('loglik') is not None:   # lm-eval's request: 'Question: ...\nAnswer:' and ' <option>' per option
                tok += self.ntok(f"Question: {r['question']}\nAnswer:") + sum(self.ntok(' ' + c['text']) for c in rec['choices'])
            else: tok += self.prompt(rec['messages']) + self.ntok(r.get('response') or '') + 1
        return 2 * self.n * tok

    def run(self, run_dir:Path) -> dict:
        "kind -> useful FLOPs of the stages a comparison computed (a stage restored from the shared cache counts once)."
        out, seen = defaultdict(float), set()
        for m in sorted(p for p in run_dir.iterdir() if (p/'stages.jsonl').exists()):
            ran = {json.loads(l)['stage'] for l in open(m/'stages.jsonl') if json.loads(l).get('event') == 'done'}
            if 'sft' in ran:
                hist = json.load(open(m/'sft_metrics.json')).get('history') or []
                toks = max((h.get('num_tokens') or 0 for h in hist), default=0)
                out['sft'] += 4 * self.n * toks
            if 'eval_m1' in ran and (m/'eval_m1').exists(): out['evaluate'] += self.evaluation(m/'eval_m1')
            for it in sorted(m.glob('iter*')):
                t = it.name
                f = self.iteration(it) if (it/'samples.jsonl').exists() else {}
                if f'{t}/sample' in ran: out['sample'] += f['sample']
                n_scored = len(list(it.glob('logps_*.jsonl')))
                ran_logps = sum(1 for s in ran if s.startswith(f'{t}/logps_'))
                if n_scored: out['logps'] += f['logps'] * ran_logps / n_scored
                if f'{t}/train' in ran: out['train'] += f.get('train', 0)
                if f'{t}/evaluate' in ran and (it/'eval').exists(): out['evaluate'] += self.evaluation(it/'eval')
        return dict(out)


def table(rows:list, head:list) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: '  '.join(str(x).rjust(n) if i else str(x).ljust(n) for i, (x, n) in enumerate(zip(r, w)))
    return '\n'.join([line(head), '  '.join('-' * n for n in w), *map(line, rows)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--base', default='57c7bc8', help="the earlier commit (default 57c7bc8: the commit before this round's speed work)")
    ap.add_argument('--preset', default='cpu-demo')
    ap.add_argument('--methods', nargs='+', default=['m1', 'dpo', 'oracle', 'cream-avg', 'cream-dyn'],
                    help="default: cpu-demo's six methods without SRLM, whose judge changed between the commits (generate -> expected)")
    ap.add_argument('--set', dest='sets', action='append', default=[], help="a config override for both runs (a field both commits know)")
    ap.add_argument('--keep', default=None, help="keep the two comparison directories here (default: a temporary folder, removed)")
    ap.add_argument('--json', default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    import torch
    sys.path.insert(0, str(ROOT))
    from cream_nb.core.config import preset, apply_overrides
    head_rev = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    base_rev = subprocess.run(['git', 'rev-parse', '--short', args.base], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    work = Path(args.keep or tempfile.mkdtemp(prefix='cream-bench-stages-')); work.mkdir(parents=True, exist_ok=True)
    tree = work/f'checkout-{base_rev}'
    print(f"== bench/stages.py  torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; "
          f"preset {args.preset}, methods {' '.join(args.methods)}{', ' + ' '.join(args.sets) if args.sets else ''}", flush=True)
    p0 = peaks()
    print("peaks before (GFLOP/s): " + ', '.join(f"{k} {v:.0f}" for k, v in p0.items()), flush=True)
    subprocess.run(['git', 'worktree', 'add', '--detach', '-f', str(tree), base_rev], cwd=ROOT, check=True, capture_output=True)
    runs = {}
    try:
        for label, src in ((f'base {base_rev}', tree), (f'this {head_rev}', ROOT)):
            out = work/('base' if src == tree else 'this')
            if out.exists(): shutil.rmtree(out)
            print(f"running {label} ...", flush=True)
            r = run_compare(src, out, args.preset, args.methods, args.sets)
            if r['rc'] != 0: sys.exit(f"bench/stages.py: the {label} comparison failed (exit {r['rc']}); see {r['log']}")
            r['stages'] = stage_seconds(out); r['dir'] = out
            r['stages']['outside stages'] = r['wall'] - sum(r['stages'].values())
            runs[label] = r
            print(f"  {r['wall']:.0f} s, peak RSS {r['rss_gb']:.2f} GB", flush=True)
    finally:
        subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=ROOT, capture_output=True)
    p1 = peaks()
    print("peaks after  (GFLOP/s): " + ', '.join(f"{k} {v:.0f}" for k, v in p1.items()))
    peak = {k: max(p0[k], p1[k]) for k in p0}
    cfg = apply_overrides(preset(args.preset), args.sets)
    counter = Counter(cfg)
    (lb, b), (lt, h) = runs.items()
    fb, fh = counter.run(b['dir']), counter.run(h['dir'])
    rows = []
    for k in KINDS:
        sb, sh = b['stages'].get(k, 0.0), h['stages'].get(k, 0.0)
        if not sb and not sh: continue
        gfs = lambda f, s: f / s / 1e9 if f and s > 0 else None
        gb, gh = gfs(fb.get(k), sb), gfs(fh.get(k), sh)
        fmt = lambda x, p='': '-' if x is None else f"{x:.0f}{p}"
        rows.append([k, f"{sb:.1f}", f"{sh:.1f}", f"{sb / sh:.2f}x" if sh > 0 and sb > 0 else '-', fmt(gb), fmt(gh),
                     fmt(None if gh is None else 100 * gh / peak['fp32'], '%'), fmt(None if gh is None else 100 * gh / peak['bf16'], '%')])
    rows.append(['wall', f"{b['wall']:.1f}", f"{h['wall']:.1f}", f"{b['wall'] / h['wall']:.2f}x", '', '', '', ''])
    print(f"\nSeconds per stage kind of `cream compare --preset {args.preset}` ({len(args.methods)} methods), {lb} against {lt}, "
          f"one after the other in this run; GFLOP/s = useful FLOPs / seconds (see the docstring)")
    print(table(rows, ['stage kind', f'{lb} s', f'{lt} s', 'speed-up', 'GFLOP/s base', 'GFLOP/s this', '% fp32 peak', '% bf16 peak']))
    norm = lambda w: w * peak['fp32'] / REF_PEAK
    print(f"\nmatmul peak here: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s (2048^3); the model's own shape: "
          f"fp32 {peak['fp32 model shape']:.0f}, bf16 {peak['bf16 model shape']:.0f}")
    for lab, r in runs.items():
        print(f"{lab}: wall {r['wall']:.0f} s = {r['wall'] / 60:.1f} min; normalised to a {REF_PEAK:.0f} GFLOP/s machine "
              f"{norm(r['wall']):.0f} s = {norm(r['wall']) / 60:.1f} min; peak RSS {r['rss_gb']:.2f} GB")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(peaks=peak, base=base_rev, this=head_rev, preset=args.preset, methods=args.methods,
                                                   sets=args.sets, runs={k: {**{x: y for x, y in r.items() if x != 'dir'}, 'flops': f}
                                                                         for (k, r), f in zip(runs.items(), (fb, fh))}), indent=1))
    if not args.keep: shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
