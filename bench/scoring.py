"""Scoring and loglik evaluation: each prompt (question) once against the plain batched forward, side by side in one run (issue 20, item 2).

    .venv/bin/python bench/scoring.py                       # the cpu-demo workloads, a few minutes on 2 cores
    .venv/bin/python bench/scoring.py --quick               # 4 prompts / 8 questions: a smoke run
    .venv/bin/python bench/scoring.py --run-dir /tmp/demo   # score a run's iteration-1 samples with its m1

Workloads (the cpu-demo preset, SmolLM2-135M embedded, LoRA adapter m1 on it as in a run, fp32):
  scoring:  iteration 1's prompts (16) x 4 responses of <= 48 tokens: the run's samples (--run-dir), or sampled here
            with the hf engine and kept in --samples for the next run; reward.batch_size = 16 sequences per pass
  eval:     100 multiple-choice questions (25 each of ARC-Easy, ARC-Challenge, OpenBookQA, SIQA), protocol 'loglik',
            eval.batch_size = 25 requests per pass
Rows, each on the same workload in the same process:
  plain forward    score_samples(share_prefix=False): every (prompt, response) a full row of a left-padded batch
  shared prefix    score_samples() (the default): each prompt run once, its KV cache repeated for its responses
  lm-eval          loglik_predictions with eval.loglik_scorer='lm-eval' (HFLM, one row per option)
  shared prefix    loglik_predictions() (the default): each question run once for all its options
tokens/s counts the tokens of every full sequence (prompt + response, question + option), the same count for both
rows of a workload, so the ratio is the speed-up. Times are the best of --repeats runs, rows interleaved. The machine
is shared: only ratios within one run compare, and the load average is printed.
"""
from __future__ import annotations
import argparse, json, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT/'bench'))
from generation import matmul_peak, setup_model, workloads   # the same workloads, model and peak measurement


def samples_for(cfg, model, tok, prompts, path:Path, run_dir):
    "Iteration 1's samples: the run's (with its prompts), else cached in `path`, else sampled now with the hf engine."
    from cream_nb.core.artifacts import read_jsonl, write_jsonl
    if run_dir:
        it = Path(run_dir)/'iter1'
        return [dict(r) for r in read_jsonl(it/'prompts.jsonl')], read_jsonl(it/'samples.jsonl'), f"run {run_dir} (iteration 1)"
    if path.exists():
        s = read_jsonl(path)
        if [r['prompt_id'] for r in s] == [p['id'] for p in prompts]: return prompts, s, f"cached {path}"
    from cream_nb.models.engine import HFEngine, GenParams
    s = HFEngine(model, tok).generate('m1', prompts, GenParams.sampling(cfg.sampling))
    write_jsonl(s, path)
    return prompts, s, f"sampled now with the hf engine (kept in {path})"


def timed(fn, repeats:int):
    "(best seconds, last result) of `repeats` calls."
    best, out = float('inf'), None
    for _ in range(repeats):
        t0 = time.perf_counter(); out = fn(); best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='4 prompts and 8 questions (a smoke run)')
    ap.add_argument('--repeats', type=int, default=2, help='timed runs per row (best counts)')
    ap.add_argument('--samples', default='/tmp/cream_bench_scoring_samples.jsonl', help='where sampled responses are kept between runs')
    ap.add_argument('--run-dir', default=None, help="a cpu-demo run directory: score its iter1 samples with its m1 instead")
    args = ap.parse_args()

    import torch
    from dataclasses import replace
    from cream_nb.core.config import EvalConfig
    from cream_nb.data.sources import load_test_set
    from cream_nb.stages.evaluate import loglik_predictions
    from cream_nb.data.answers import MC_LABELS
    from cream_nb.stages.rewards import score_samples, _pairs
    from cream_nb.models.logprobs import build_sequence
    t_start, load0 = time.time(), os.getloadavg()
    cfg, prompts, _ = workloads(args.quick)
    if args.run_dir:                                     # the run's SFT result m1 on the base
        from cream_nb.models.loading import load_adapter, load_model
        model, tok = load_model(cfg.model)
        model = load_adapter(model, Path(args.run_dir)/'m1', 'm1').eval()
    else: model, tok = setup_model(cfg)
    prompts, samples, source = samples_for(cfg, model, tok, prompts, Path(args.samples), args.run_dir)
    if args.quick: samples = samples[:4]
    mc = [t for t in cfg.eval.tasks if t in MC_LABELS]
    questions = [dict(r) for t in mc for r in load_test_set(t, source='offline', limit=2 if args.quick else 25)]
    print(f"== bench/scoring.py  torch {torch.__version__}, {torch.get_num_threads()} threads, model {cfg.model.name} + LoRA m1, fp32")
    print(f"   scoring: {len(samples)} prompts x {len(samples[0]['responses'])} responses from {source}; reward.batch_size {cfg.reward.batch_size}")
    print(f"   eval: {len(questions)} multiple-choice questions ({', '.join(mc)}), eval.batch_size {cfg.eval.batch_size}")
    peaks = {str(dt).split('.')[-1]: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    print('   matmul peak (2048^3): ' + ', '.join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)

    msgs, resps, _ = _pairs(prompts, samples)
    seqs = [build_sequence(tok, m, r) for m, r in zip(msgs, resps)]
    n_tok, n_resp = sum(len(s) for s, _ in seqs), sum(len(s) - n for s, n in seqs)
    bs = cfg.reward.batch_size
    rows, res = {'plain forward': False, 'shared prefix': True}, {}
    for _ in range(args.repeats):                        # interleaved, best of the repeats
        for name, share in rows.items():
            t, out = timed(lambda: score_samples(model, tok, prompts, samples, bs, share_prefix=share), 1)
            res[name] = (min(t, res.get(name, (float('inf'),))[0]), out)
    flat = {k: torch.tensor([x for v in o.values() for x in v['logps']], dtype=torch.float64) for k, (_, o) in res.items()}
    diff_s = (flat['shared prefix'] - flat['plain forward']).abs().max().item()

    ecfg = {'lm-eval (HFLM)': replace(cfg.eval, loglik_scorer='lm-eval'), 'shared prefix': replace(cfg.eval, loglik_scorer='shared')}
    eres = {}
    for _ in range(args.repeats):
        for name, c in ecfg.items():
            t, out = timed(lambda: loglik_predictions(model, tok, questions, c, progress=False), 1)
            eres[name] = (min(t, eres.get(name, (float('inf'),))[0]), out)
    ref, own = eres['lm-eval (HFLM)'][1], eres['shared prefix'][1]
    diff_e = max(abs(a - b) for o, r in zip(own, ref) for a, b in zip(o['loglik'], r['loglik']))
    same = sum(o['extracted'] == r['extracted'] for o, r in zip(own, ref)); same_n = sum(o['extracted_norm'] == r['extracted_norm'] for o, r in zip(own, ref))
    from cream_nb.stages.evaluate import harness_pair_ids
    e_tok = sum(len(c) + len(x) for q in questions for c, x in
                [harness_pair_ids(tok, f"Question: {d['question']}\nAnswer:", f" {ch}") for d in [_doc(q)] for ch in d['choices']])

    print(f"\n{'':26s} {'tokens':>7s} {'s':>7s} {'tok/s':>8s} {'x plain':>8s}   max |logp - plain|")
    base = res['plain forward'][0]
    for name, (t, _) in res.items():
        print(f"scoring  {name:17s} {n_tok:7d} {t:7.2f} {n_tok / t:8.0f} {base / t:7.2f}x   {0.0 if name == 'plain forward' else diff_s:.2e}")
    base = eres['lm-eval (HFLM)'][0]
    for name, (t, _) in eres.items():
        print(f"eval     {name:17s} {e_tok:7d} {t:7.2f} {e_tok / t:8.0f} {base / t:7.2f}x   {0.0 if name.startswith('lm-eval') else diff_e:.2e}")
    print(f"scoring: {len(seqs)} sequences, {n_resp} of the {n_tok} tokens are responses; eval: acc picks equal {same}/{len(own)}, "
          f"acc_norm picks equal {same_n}/{len(own)}")
    print(f"load average (1, 5, 15 min): at start {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, at end "
          + ' '.join(f'{x:.1f}' for x in os.getloadavg()) + f"; {os.cpu_count()} cores; total {time.time() - t_start:.0f} s")


def _doc(rec):
    "The question and option texts of a multiple-choice record, as the loglik protocol scores them."
    from cream_nb.data.records import parse_prompt
    q, ch = parse_prompt(rec['messages'][-1]['content'])
    return dict(question=q, choices=list(ch.values()))


if __name__ == '__main__': main()
