"""fp32 against bf16 for scoring and loglik evaluation, side by side in one run (issue 20, item 1): speed and agreement.

    .venv/bin/python bench/precision.py --run-dir /tmp/perf-demo     # a cpu-demo run directory with m1 (after SFT)

Workloads (the cpu-demo preset, SmolLM2-135M embedded, the run's SFT adapter m1):
  scoring: iteration 1's 16 prompts x 4 responses (<= 48 tokens) sampled by m1 with the hf engine (kept in --samples),
           scored by m1 and m0 (adapters off), each prompt once (the default path); r_1 = log pi_1 - log pi_0 as in
           iteration 1, pairs = (argmax, argmin) of r_1; M0's length-normalised likelihood ranks too (the previous reward)
  eval:    4 x --per-task multiple-choice questions (ARC-Easy, ARC-Challenge, OpenBookQA, SIQA; 25 each by default) scored by m1, loglik protocol
bf16 = `cream_nb.models.precision.matmul_precision`: bf16 autocast for the matmuls, output layer, log-softmax and sums in fp32.
Bars (issue 20): pairs identical for >= 98% of prompts (scoring), predicted options identical for >= 99% (eval).
Times are the best of --repeats runs, precisions interleaved; the machine is shared, so only the ratio compares.
"""
from __future__ import annotations
import argparse, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'bench'))
from generation import matmul_peak, workloads


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--run-dir', required=True, help='cpu-demo run directory holding m1 (the SFT adapter)')
    ap.add_argument('--samples', default='/tmp/cream_bench_precision_samples.jsonl', help='m1 samples kept between runs')
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--per-task', type=int, default=25, help='eval: questions per multiple-choice task')
    args = ap.parse_args()

    import numpy as np, torch
    from dataclasses import replace
    from scipy.stats import kendalltau
    from cream_nb.data.sources import load_test_set
    from cream_nb.models.engine import HFEngine, GenParams
    from cream_nb.stages.evaluate import loglik_predictions
    from cream_nb.data.answers import MC_LABELS
    from cream_nb.core.artifacts import read_jsonl, write_jsonl
    from cream_nb.models.loading import load_adapter, load_model, use_model
    from cream_nb.stages.rewards import score_samples, implicit_reward, normalized_likelihood
    from cream_nb.models.precision import bf16_matmuls
    t_start, load0 = time.time(), os.getloadavg()
    cfg, prompts, _ = workloads(False)
    model, tok = load_model(cfg.model)
    model = load_adapter(model, Path(args.run_dir)/'m1', 'm1').eval()
    sp = Path(args.samples)
    samples = read_jsonl(sp) if sp.exists() else None
    if not samples or [s['prompt_id'] for s in samples] != [p['id'] for p in prompts]:
        samples = HFEngine(model, tok).generate('m1', prompts, GenParams.sampling(cfg.sampling)); write_jsonl(samples, sp)
    mc = [t for t in cfg.eval.tasks if t in MC_LABELS]
    questions = [dict(r) for t in mc for r in load_test_set(t, source='offline', limit=args.per_task)]
    print(f"== bench/precision.py  torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 matmuls: {bf16_matmuls()}, m1 from {args.run_dir}")
    print(f"   scoring: {len(samples)} prompts x {len(samples[0]['responses'])} responses (m1's samples), m1 and m0; eval: {len(questions)} questions")
    peaks = {str(dt).split('.')[-1]: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    print('   matmul peak (2048^3): ' + ', '.join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    times, scores = {}, {}
    for _ in range(args.repeats):
        for prec in ('fp32', 'bf16'):
            t0 = time.perf_counter(); out = {}
            for name in ('m1', 'm0'):
                with use_model(model, name) as m: out[name] = score_samples(m, tok, prompts, samples, cfg.reward.batch_size, precision=prec)
            times[('scoring', prec)] = min(time.perf_counter() - t0, times.get(('scoring', prec), float('inf'))); scores[prec] = out
    def rewards(out):
        cur = {p: implicit_reward(out['m1'][p]['logps'], out['m0'][p]['logps']).numpy() for p in out['m1']}
        prev = {p: normalized_likelihood(out['m0'][p]['logps'], out['m0'][p]['n_tokens']).numpy() for p in out['m0']}
        return cur, prev
    (c32, p32), (c16, p16) = rewards(scores['fp32']), rewards(scores['bf16'])
    pair = lambda r: (int(np.argmax(r)), int(np.argmin(r)))
    same_pairs = sum(pair(c32[p]) == pair(c16[p]) for p in c32) / len(c32)
    tau = lambda a, b: np.mean([kendalltau(a[p], b[p]).statistic for p in a])
    move = max(abs(c32[p] - c16[p]).max() for p in c32)
    lp_move = max(abs(np.array(scores['fp32'][n][p]['logps']) - scores['bf16'][n][p]['logps']).max() for n in ('m1', 'm0') for p in c32)
    spread = np.mean([np.ptp(c32[p]) for p in c32])

    preds = {}
    for _ in range(args.repeats):
        for prec in ('fp32', 'bf16'):
            c = replace(cfg.eval, precision=prec)
            with use_model(model, 'm1') as m:
                t0 = time.perf_counter(); preds[prec] = loglik_predictions(m, tok, questions, c, progress=False)
            times[('eval', prec)] = min(time.perf_counter() - t0, times.get(('eval', prec), float('inf')))
    same_acc = np.mean([a['extracted'] == b['extracted'] for a, b in zip(preds['fp32'], preds['bf16'])])
    same_norm = np.mean([a['extracted_norm'] == b['extracted_norm'] for a, b in zip(preds['fp32'], preds['bf16'])])
    ll_move = max(abs(x - y) for a, b in zip(preds['fp32'], preds['bf16']) for x, y in zip(a['loglik'], b['loglik']))
    acc = {p: np.mean([r['correct'] for r in preds[p]]) for p in preds}

    print(f"\n{'':10s} {'fp32 s':>8s} {'bf16 s':>8s} {'speed-up':>9s}   agreement of bf16 with fp32")
    print(f"{'scoring':10s} {times[('scoring', 'fp32')]:8.2f} {times[('scoring', 'bf16')]:8.2f} {times[('scoring', 'fp32')] / times[('scoring', 'bf16')]:8.2f}x   "
          f"pairs identical {same_pairs:.1%} (bar 98%), mean Kendall r_1 {tau(c32, c16):.3f}, M0 likelihood {tau(p32, p16):.3f}; "
          f"max |d log-prob| {lp_move:.3f}, max |d r_1| {move:.3f} (mean spread of r_1 in a prompt {spread:.3f})")
    print(f"{'eval':10s} {times[('eval', 'fp32')]:8.2f} {times[('eval', 'bf16')]:8.2f} {times[('eval', 'fp32')] / times[('eval', 'bf16')]:8.2f}x   "
          f"acc picks identical {same_acc:.1%}, acc_norm picks {same_norm:.1%} (bar 99%); max |d loglik| {ll_move:.3f}; "
          f"accuracy fp32 {acc['fp32']:.3f}, bf16 {acc['bf16']:.3f}")
    print(f"decision: reward.precision auto -> {'bf16' if same_pairs >= 0.98 else 'fp32'}, eval.precision auto -> "
          f"{'bf16' if min(same_acc, same_norm) >= 0.99 else 'fp32'}")
    print(f"load average (1, 5, 15 min): at start {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, at end "
          + ' '.join(f'{x:.1f}' for x in os.getloadavg()) + f"; {os.cpu_count()} cores; total {time.time() - t_start:.0f} s")


if __name__ == '__main__': main()
