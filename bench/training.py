"""fp32 against bf16 training, side by side in one run (issue 20, item 1): time per step and the loss curves of 3 seeds each.

    .venv/bin/python bench/training.py --run-dir /tmp/perf-demo       # a cpu-demo run directory holding m1 (after SFT)
    .venv/bin/python bench/training.py --run-dir /tmp/perf-demo --quick   # 1 seed, 1 epoch each: a smoke run

Workloads (the cpu-demo preset: SmolLM2-135M embedded, LoRA r 16 on every linear layer, max_length 256):
  sft: the cpu-demo seed SFT, 24 examples, batch 8, from a fresh adapter (as `CreamRun.sft`), --sft-epochs epochs
  dpo: iteration 1 of cpu-demo: m1's 16 prompts x 4 samples (bench/precision.py's file, sampled if missing), r_1 =
       log pi_1 - log pi_0 in fp32, pairs (best, worst) with m1's log-probs as the reference, C = 1; the policy starts
       from m1 (as `Iteration.train`), batch 4, --dpo-epochs epochs
Each (seed, precision) is one training with the loop's own `train_sft` / `train_dpo`; the precision goes through the config
switch (`sft.precision`, `dpo.precision`: Trainer's bf16=True on CPU, bf16 autocast with fp32 master weights and
optimizer). Seeds change the LoRA initialisation (SFT) and the data order; fp32 and bf16 of one seed see the same data.
Time per step: the training's seconds over its steps (Trainer's whole loop: forward, backward, optimizer), median over seeds.
Bar (issue 20): every bf16 run's final loss (mean of its last --tail steps) lies within the fp32 runs' range of the same
quantity; then `auto` may pick bf16 for that kind of training. The machine is shared: only ratios measured here compare.
"""
from __future__ import annotations
import argparse, json, os, shutil, statistics, sys, tempfile, time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'bench'))
from generation import matmul_peak, PeakRSS


def final_loss(history, tail): return statistics.fmean(h['loss'] for h in history[-tail:])

def curves_html(runs:dict, path:Path):
    "The loss curves, fp32 solid and bf16 dashed, one panel per kind of training."
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    kinds = sorted({k for k, _, _ in runs})
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[f'{k}: training loss per step' for k in kinds])
    colors = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728']
    for (kind, prec, seed), r in runs.items():
        fig.add_trace(go.Scatter(x=[h['step'] for h in r['history']], y=[h['loss'] for h in r['history']], mode='lines+markers',
                                 name=f'{kind} {prec} seed {seed}', line=dict(color=colors[seed % 4], dash='solid' if prec == 'fp32' else 'dash')),
                      row=1, col=kinds.index(kind) + 1)
    fig.update_layout(width=1000, height=420, template='plotly_white')
    fig.write_html(path, include_plotlyjs='cdn')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--run-dir', required=True, help='cpu-demo run directory holding m1 (the SFT adapter)')
    ap.add_argument('--samples', default='/tmp/cream_bench_precision_samples.jsonl', help="m1's iteration-1 samples (kept between runs)")
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--sft-epochs', type=float, default=2, help='cpu-demo trains 1 epoch (3 steps); 2 give a 6-step curve')
    ap.add_argument('--dpo-epochs', type=float, default=2, help='cpu-demo trains 1 epoch (4 steps); 2 give an 8-step curve')
    ap.add_argument('--tail', type=int, default=2, help='final loss: the mean of the last this many steps')
    ap.add_argument('--html', default='/tmp/bench_training.html', help='the overlaid loss curves (plotly)')
    ap.add_argument('--quick', action='store_true')
    args = ap.parse_args()
    if args.quick: args.seeds, args.sft_epochs, args.dpo_epochs = 1, 1, 1

    import numpy as np, torch
    from transformers import set_seed
    from datasets import disable_progress_bars; disable_progress_bars()
    from cream_nb.core.artifacts import read_jsonl, write_jsonl
    from cream_nb.models.loading import load_adapter, load_model, add_adapter, use_model
    from cream_nb.models.engine import HFEngine, GenParams
    from cream_nb.models.precision import bf16_matmuls
    from cream_nb.data.sources import seed_data
    from cream_nb.stages.sft import train_sft
    from cream_nb.stages.dpo import train_dpo
    from cream_nb.stages.rewards import score_samples, implicit_reward
    from cream_nb.stages.preferences import preference_pairs
    from generation import workloads
    import logging; logging.getLogger('cream_nb').setLevel(logging.WARNING)
    t_start, load0 = time.time(), os.getloadavg()
    cfg, prompts, _ = workloads(False)
    base, tok = load_model(cfg.model)
    model = load_adapter(base, Path(args.run_dir)/'m1', 'm1')
    sp = Path(args.samples)
    samples = read_jsonl(sp) if sp.exists() else None
    if not samples or [s['prompt_id'] for s in samples] != [p['id'] for p in prompts]:
        with use_model(model, 'm1') as m: samples = HFEngine(m, tok).generate('m1', prompts, GenParams.sampling(cfg.sampling))
        write_jsonl(samples, sp)
    lp = {}
    for name in ('m1', 'm0'):
        with use_model(model, name) as m: lp[name] = score_samples(m, tok, prompts, samples, cfg.reward.batch_size)
    rewards = {p: implicit_reward(lp['m1'][p]['logps'], lp['m0'][p]['logps']).tolist() for p in lp['m1']}
    pairs, _ = preference_pairs(prompts, samples, rewards, ref_logps={p: lp['m1'][p]['logps'] for p in lp['m1']})
    seed_records = seed_data(cfg.data)
    if hasattr(seed_records, 'to_list'): seed_records = seed_records.to_list()
    print(f"== bench/training.py  torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 matmuls: {bf16_matmuls()}, m1 from {args.run_dir}")
    print(f"   sft: {len(seed_records)} seed examples x {args.sft_epochs:g} epochs, batch {cfg.sft.batch_size}; "
          f"dpo: {len(pairs)} pairs x {args.dpo_epochs:g} epochs, batch {cfg.dpo.batch_size}; seeds 0..{args.seeds - 1}")
    peaks = {str(dt).split('.')[-1]: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    print('   matmul peak (2048^3): ' + ', '.join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    runs, rss = {}, {}
    work = Path(tempfile.mkdtemp(prefix='bench-training-'))
    try:
        for seed in range(args.seeds):
            for prec in ('fp32', 'bf16'):   # interleaved: a slow spell of the machine hits both
                set_seed(seed + 1)
                if 'sft' in model.peft_config: model.delete_adapter('sft')
                model = add_adapter(model, 'sft', cfg.model)
                with PeakRSS() as r:
                    m = train_sft(model, tok, seed_records, replace(cfg.sft, epochs=args.sft_epochs, save_steps=0, precision=prec),
                                  work/f'sft-{prec}-{seed}', seed=seed, progress=False)
                runs[('sft', prec, seed)], rss[('sft', prec)] = m, max(r.peak, rss.get(('sft', prec), 0))
                set_seed(seed + 2)
                if 'dpo' in model.peft_config: model.delete_adapter('dpo')
                model = add_adapter(model, 'dpo', cfg.model, init_from='m1')
                with PeakRSS() as r:
                    m = train_dpo(model, tok, pairs, replace(cfg.dpo, epochs=args.dpo_epochs, save_steps=0, precision=prec),
                                  work/f'dpo-{prec}-{seed}', consistency=1.0, seed=seed, progress=False)
                runs[('dpo', prec, seed)], rss[('dpo', prec)] = m, max(r.peak, rss.get(('dpo', prec), 0))
                print(f"   seed {seed} {prec}: sft {runs[('sft', prec, seed)]['seconds_per_step']:.2f} s/step, "
                      f"dpo {runs[('dpo', prec, seed)]['seconds_per_step']:.2f} s/step", flush=True)
    finally: shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'':5s} {'fp32 s/step':>11s} {'bf16 s/step':>11s} {'speed-up':>9s}  {'fp32 final losses':>26s}  {'bf16 final losses':>26s}  bar")
    decision = {}
    for kind in ('sft', 'dpo'):
        t = {p: statistics.median(runs[(kind, p, s)]['seconds_per_step'] for s in range(args.seeds)) for p in ('fp32', 'bf16')}
        fl = {p: [final_loss(runs[(kind, p, s)]['history'], args.tail) for s in range(args.seeds)] for p in ('fp32', 'bf16')}
        lo, hi = min(fl['fp32']), max(fl['fp32'])
        ok = args.seeds > 1 and all(lo <= x <= hi for x in fl['bf16'])
        decision[kind] = ok
        print(f"{kind:5s} {t['fp32']:11.2f} {t['bf16']:11.2f} {t['fp32'] / t['bf16']:8.2f}x  "
              f"{' '.join(f'{x:8.4f}' for x in fl['fp32']):>26s}  {' '.join(f'{x:8.4f}' for x in fl['bf16']):>26s}  "
              f"{'within' if ok else 'outside'} [{lo:.4f}, {hi:.4f}]")
        same_seed = [abs(a - b) for a, b in zip(fl['fp32'], fl['bf16'])]
        print(f"      |bf16 - fp32| of one seed: max {max(same_seed):.4f}, mean {statistics.fmean(same_seed):.4f}; "
              f"fp32 spread over seeds {hi - lo:.4f}; peak RSS fp32 {rss[(kind, 'fp32')]:.0f} MB, bf16 {rss[(kind, 'bf16')]:.0f} MB")
    print("\nloss per step (fp32 | bf16), seed by seed:")
    for kind in ('sft', 'dpo'):
        for s in range(args.seeds):
            a, b = runs[(kind, 'fp32', s)]['history'], runs[(kind, 'bf16', s)]['history']
            print(f"  {kind} seed {s}: " + '  '.join(f"{x['loss']:.4f}|{y['loss']:.4f}" for x, y in zip(a, b)))
    curves_html(runs, Path(args.html))
    print(f"curves: {args.html}")
    print(f"decision: sft.precision auto -> {'bf16' if decision['sft'] else 'fp32'}, dpo.precision auto -> {'bf16' if decision['dpo'] else 'fp32'}")
    print(f"load average (1, 5, 15 min): at start {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, at end "
          + ' '.join(f'{x:.1f}' for x in os.getloadavg()) + f"; {os.cpu_count()} cores; total {time.time() - t_start:.0f} s")


if __name__ == '__main__': main()
