"""Generation throughput on this machine, every engine side by side in one run (issue 13).

    .venv/bin/python bench/generation.py              # the cpu-demo workloads, a few minutes on 2 cores
    .venv/bin/python bench/generation.py --quick      # 4 prompts / 8 questions: a smoke run
    .venv/bin/python bench/generation.py --vllm-python /path/to/.venv-vllm/bin/python --vllm-root /path/to/checkout

Workloads (the cpu-demo preset, SmolLM2-135M embedded, a LoRA adapter `m1` on it as in a run):
  sampling: iteration 1's prompts (16) x 4 responses x at most 48 new tokens (T = 0.8, top_p = 0.95)
  eval:     greedy answers to the cpu-demo evaluation questions (20 per task, 100 in all, at most 64 new tokens)
Rows, each on the same workload:
  one prompt at a time    model.generate per prompt (num_return_sequences=N), adapter unmerged, fp32 (a naive loop)
  sample_responses before the engine: model.generate per batch with num_return_sequences (copied below)
  hf engine fp32 / bf16   cream_nb.models.engine.HFEngine with dtype float32 / bfloat16 ('auto' picks the default)
  vllm engine             cream_nb.models.vllm.VLLMEngine, run in the vLLM environment in a subprocess
tokens/s counts every generated token (a response's tokens plus its end token). The ratios are to the one-prompt
baseline of the same run; on a shared machine only they are comparable, so the load average is printed too.
Peak RSS: the whole process's peak while the row ran (the model, data and earlier rows included), and how far it
rose above where the row started (what the row itself allocated: the hf engine's merged copy, caches, logits).
The vLLM row runs in its own process (init time and memory are its own).
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ---- measuring -----------------------------------------------------------------------------------------
def rss_mb() -> float:
    "This process's resident memory now, MB."
    with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20

class PeakRSS:
    "Peak resident memory of this process while the body runs (sampled every 20 ms), and how far above the start, MB."
    def __enter__(self):
        self.start = self.peak = rss_mb(); self._stop = threading.Event()
        def watch():
            while not self._stop.wait(0.02): self.peak = max(self.peak, rss_mb())
        self._t = threading.Thread(target=watch, daemon=True); self._t.start(); return self
    def __exit__(self, *exc):
        self._stop.set(); self._t.join(); self.peak = max(self.peak, rss_mb()); self.rise = self.peak - self.start

def matmul_peak(dtype, n:int=2048, reps:int=4) -> float:
    "GFLOP/s of an n x n matrix product in `dtype` (best of `reps`)."
    import torch
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float('inf')
    for _ in range(reps):
        t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9

def count_tokens(records, max_new:int) -> int:
    "Generated tokens: each response's tokens plus the end token it stopped at (none when cut at max_new)."
    return sum(len(ids) + (len(ids) < max_new) for r in records for ids in r['response_token_ids'])


# ---- the old path (sample_responses before the engine), kept for comparison --------------------------------
def old_sample_responses(model, tokenizer, prompts, cfg, greedy=False):
    "cream_nb.stages.sampling.sample_responses as it was before issue 13: model.generate per batch, num_return_sequences=N."
    import torch
    from transformers import set_seed
    from cream_nb.stages.sampling import generation_config
    from cream_nb.models.engine import chat_prompt_ids, length_batches, decode_responses, end_token_ids
    rows = [(r['id'], r['messages']) for r in prompts]
    ids = [chat_prompt_ids(tokenizer, m) for _, m in rows]
    gen = generation_config(model, tokenizer, cfg, greedy)
    n, stop = gen.num_return_sequences, end_token_ids(model, tokenizer) + [gen.pad_token_id]
    out = []
    for b, idx in enumerate(length_batches([len(x) for x in ids], cfg.batch_size)):
        enc = tokenizer.pad({'input_ids': [ids[i] for i in idx]}, padding_side='left', return_tensors='pt')
        set_seed(cfg.seed + b)
        with torch.inference_mode(): new = model.generate(**enc, generation_config=gen)[:, enc['input_ids'].shape[1]:]
        texts, toks = decode_responses(tokenizer, new, stop)
        out += [(i, {'prompt_id': rows[i][0], 'responses': texts[j*n:(j+1)*n], 'response_token_ids': toks[j*n:(j+1)*n]})
                for j, i in enumerate(idx)]
    return [r for _, r in sorted(out, key=lambda x: x[0])]

def one_at_a_time(model, tokenizer, prompts, cfg, greedy=False):
    "What a naive loop does: one model.generate call per prompt."
    from dataclasses import replace
    return [old_sample_responses(model, tokenizer, [p], replace(cfg, batch_size=1), greedy)[0] for p in prompts]


# ---- workloads ---------------------------------------------------------------------------------------------
def workloads(quick:bool):
    from cream_nb.core.config import preset
    from cream_nb.data.sources import load_prompt_pool, load_test_set
    from cream_nb.data.records import split_prompts
    cfg = preset('cpu-demo')
    pool = load_prompt_pool(source='offline', tasks=cfg.data.tasks, seed=cfg.data.seed)
    prompts = split_prompts(pool, cfg.loop.iterations, per_iteration=cfg.data.prompts_per_iteration, seed=cfg.data.seed)[0]
    questions = [dict(r) for t in cfg.eval.tasks for r in load_test_set(t, source='offline', limit=cfg.eval.limit)]
    prompts = [dict(r) for r in prompts]
    if quick: prompts, questions = prompts[:4], questions[:8]
    return cfg, prompts, questions

def setup_model(cfg):
    "M0 (embedded SmolLM2-135M) with a LoRA adapter m1 as the loop makes it (fresh adapter, as after add_adapter)."
    import torch
    from cream_nb.models.loading import load_model, add_adapter
    model, tok = load_model(cfg.model)
    torch.manual_seed(0)
    model = add_adapter(model, 'm1', cfg.model).eval()
    with torch.no_grad():   # a trained adapter is not zero: give B small values so m1 differs from m0
        for n, p in model.named_parameters():
            if 'lora_B' in n: p.normal_(0, 1e-3)
    return model, tok


# ---- the vLLM row, in its own environment ------------------------------------------------------------------
def vllm_worker(args):
    "Runs inside the vLLM environment: both workloads through VLLMEngine, results as JSON on stdout's last line."
    import torch
    from cream_nb.models.engine import GenParams
    from cream_nb.models.loading import embedded_model_dir, load_tokenizer
    from cream_nb.models.vllm import VLLMEngine
    job = json.loads(Path(args.vllm_worker).read_text())
    base = embedded_model_dir()
    tok = load_tokenizer(base)
    resolve = lambda name: ('base', None) if name == 'm0' else ('lora', job['adapter'])
    res = {}
    with PeakRSS() as mem:
        t0 = time.time()
        eng = VLLMEngine(str(base), tok, resolve, lora_rank=job['lora_r'], seed=job['seed'])
        eng.generate('m1', job['prompts'][:1], GenParams(n=1, max_new_tokens=2))   # loads the adapter, warms up
        res['init_s'] = time.time() - t0
        for name, ps, params in [('sampling', job['prompts'], GenParams(**job['sampling'])), ('eval', job['questions'], GenParams(**job['eval']))]:
            t0 = time.time(); recs = eng.generate('m1', ps, params); dt = time.time() - t0
            res[name] = dict(seconds=dt, tokens=count_tokens(recs, params.max_new_tokens))
        eng.close()
    res['peak_rss_mb'], res['rise_mb'] = mem.peak, mem.rise
    print(json.dumps(res))

def vllm_row(python:Path, root:Path, adapter_dir, cfg, prompts, questions, sp, ep, timeout:int):
    "Start the worker in the vLLM environment; its measurements, or why there are none."
    from dataclasses import asdict
    job = dict(adapter=str(adapter_dir), lora_r=cfg.model.lora_r, seed=cfg.sampling.seed, prompts=prompts,
               questions=questions, sampling=asdict(sp), eval=asdict(ep))
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f: json.dump(job, f)
    env = {**os.environ, 'PYTHONPATH': str(root)}
    try:
        r = subprocess.run([str(python), str(Path(__file__).resolve()), '--vllm-worker', f.name], cwd=root, env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired: return None, f"vllm worker ran over {timeout} s"
    finally: os.unlink(f.name)
    if r.returncode != 0: return None, f"vllm worker failed (rc {r.returncode}): {(r.stderr or r.stdout).strip().splitlines()[-1:]}"
    return json.loads(r.stdout.strip().splitlines()[-1]), None


# ---- the run -----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--quick', action='store_true', help='4 prompts and 8 questions (a smoke run)')
    ap.add_argument('--vllm-python', default=None, help='python of the vLLM environment (default: .venv-vllm/bin/python of this checkout)')
    ap.add_argument('--vllm-root', default=str(ROOT), help='checkout whose cream_nb the vLLM worker imports')
    ap.add_argument('--vllm-timeout', type=int, default=240)
    ap.add_argument('--vllm-worker', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vllm_worker: return vllm_worker(args)

    import torch
    from dataclasses import replace
    from cream_nb.models.engine import HFEngine, GenParams
    from cream_nb.models.precision import cpu_has_bf16, generation_dtype
    from cream_nb.models.loading import save_model
    t_start, load0 = time.time(), os.getloadavg()
    cfg, prompts, questions = workloads(args.quick)
    model, tok = setup_model(cfg)
    sc = cfg.sampling
    ec = replace(sc, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    sp = GenParams.sampling(sc)
    ep = GenParams(greedy=True, max_new_tokens=cfg.eval.max_new_tokens, seed=sc.seed, batch_size=cfg.eval.batch_size)
    default_dt = generation_dtype('auto', model)
    print(f"== bench/generation.py  torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 instructions: {cpu_has_bf16()}, "
          f"default hf dtype: {str(default_dt).split('.')[-1]}")
    print(f"   sampling: {len(prompts)} prompts x {sc.n_responses} x <= {sc.max_new_tokens} tokens;  eval: {len(questions)} questions greedy, <= {ec.max_new_tokens} tokens")
    peaks = {str(dt).split('.')[-1]: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    print('   matmul peak (2048^3): ' + ', '.join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))

    data, cfgs, params = {'sampling': prompts, 'eval': questions}, {'sampling': sc, 'eval': ec}, {'sampling': sp, 'eval': ep}
    def generate_row(fn):
        return lambda: (lambda wl: fn(model, tok, data[wl], cfgs[wl], greedy=wl == 'eval'))
    def engine_row(dt):
        def prepare():
            e = HFEngine(model, tok, dtype=dt)
            e.generate('m1', prompts[:1], GenParams(n=1, max_new_tokens=2))   # the merged copy is made outside the timing
            return lambda wl: e.generate('m1', data[wl], params[wl])
        return prepare
    rows = [('one prompt at a time (generate, fp32)', generate_row(one_at_a_time)),
            ('sample_responses before (generate, N copies)', generate_row(old_sample_responses))]
    rows += [(f"hf engine {dt}{' (default)' if getattr(torch, dt) == default_dt else ''}", engine_row(dt)) for dt in ('float32', 'bfloat16')]
    results = []
    for name, prepare in rows:
        run, res = prepare(), {}
        for wl in ('sampling', 'eval'):
            with torch.no_grad(), PeakRSS() as mem:
                t0 = time.time(); recs = run(wl); secs = time.time() - t0
            res[wl] = dict(seconds=secs, tokens=count_tokens(recs, params[wl].max_new_tokens), peak_rss_mb=mem.peak, rise_mb=mem.rise)
        results.append((name, res))
        print(f"   measured: {name}: " + ', '.join(f"{wl} {r['tokens'] / r['seconds']:.1f} tok/s" for wl, r in res.items()), flush=True)

    py = Path(args.vllm_python) if args.vllm_python else ROOT/'.venv-vllm'/'bin'/'python'
    vllm_note = None
    if not py.exists(): vllm_note = f"vllm engine: absent ({py} does not exist: make the vLLM environment to include it)"
    else:
        with tempfile.TemporaryDirectory() as d:
            save_model(model, Path(d)/'m1', name='m1', tokenizer=tok)
            vr, err = vllm_row(py, Path(args.vllm_root), Path(d)/'m1', cfg, prompts, questions, sp, ep, args.vllm_timeout)
        if err: vllm_note = f"vllm engine: {err}"
        else:
            results.append((f"vllm engine (init {vr['init_s']:.0f} s, not counted)",
                            {wl: {**vr[wl], 'peak_rss_mb': vr['peak_rss_mb'], 'rise_mb': vr['rise_mb']} for wl in ('sampling', 'eval')}))

    base = {wl: results[0][1][wl]['tokens'] / results[0][1][wl]['seconds'] for wl in ('sampling', 'eval')}
    print(f"\n{'':48s} {'sampling workload':>30s}   {'eval workload (greedy)':>30s}   {'peak RSS, MB':>14s}")
    print(f"{'':48s} {'tokens':>7s} {'s':>6s} {'tok/s':>7s} {'x base':>7s}   {'tokens':>7s} {'s':>6s} {'tok/s':>7s} {'x base':>7s}   {'process':>7s} {'+row':>6s}")
    for name, res in results:
        cells = []
        for wl in ('sampling', 'eval'):
            r = res[wl]; tps = r['tokens'] / r['seconds']
            cells.append(f"{r['tokens']:7d} {r['seconds']:6.1f} {tps:7.1f} {tps / base[wl]:6.2f}x")
        print(f"{name:48s} {cells[0]}   {cells[1]}   {max(res[w]['peak_rss_mb'] for w in res):7.0f} {max(res[w]['rise_mb'] for w in res):6.0f}")
    if vllm_note: print(vllm_note)
    print(f"\nload average (1, 5, 15 min): at start {load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f}, at end "
          + ' '.join(f'{x:.1f}' for x in os.getloadavg()) + f"; {os.cpu_count()} cores; total {time.time() - t_start:.0f} s")


if __name__ == '__main__': main()
