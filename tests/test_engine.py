"The generation engine (cream_nb.models.engine): exact greedy decoding, sampled distributions, seeds, LoRA left as it was."
import ast, contextlib, re
from pathlib import Path
import pytest, torch

from cream_nb.core.config import ConfigError, ModelConfig, SamplingConfig
from cream_nb.models.engine import GenParams, HFEngine, Engine, chat_prompt_ids, decode, decode_responses, end_token_ids, make_engine, next_tokens, nucleus_keep, resolve_engine_kind, _keep_sorted
from cream_nb.models.loading import add_adapter, load_model, use_model
from cream_nb.stages.sampling import generation_config

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ['Name a colour.', 'What is the capital of France, the country in Europe west of Germany?', 'Hi',
             'Explain photosynthesis in one sentence, please.', 'Why is the sky blue?']


@pytest.fixture(scope='module')
def tiny():
    return load_model('tiny', dtype='float32')

@pytest.fixture(scope='module')
def lora():
    "The tiny model with an adapter m1 whose B matrices are not zero (so m1 differs from m0)."
    model, tok = load_model('tiny', dtype='float32')
    pm = add_adapter(model, 'm1', ModelConfig(lora_r=4, lora_alpha=8, lora_target_modules=['q_proj', 'v_proj', 'up_proj']))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval(), tok

def _prompts(k=len(QUESTIONS)):
    return [{'id': f'q{i}', 'messages': [{'role': 'user', 'content': q}]} for i, q in enumerate(QUESTIONS[:k])]

def _generate_greedy(model, tok, prompts, max_new):
    "Reference: model.generate's greedy decoding of the batch, cut and decoded as the engine does."
    ids = [chat_prompt_ids(tok, p['messages']) for p in prompts]
    enc = tok.pad({'input_ids': ids}, padding_side='left', return_tensors='pt')
    with torch.inference_mode():
        out = model.generate(**enc, generation_config=generation_config(model, tok, SamplingConfig(max_new_tokens=max_new), greedy=True))
    return decode_responses(tok, out[:, enc['input_ids'].shape[1]:], end_token_ids(model, tok) + [tok.pad_token_id])


# ---- configuration -------------------------------------------------------------------------------------------
def test_config_and_params_are_validated():
    assert SamplingConfig().engine == 'auto' and SamplingConfig(engine='vllm').engine == 'vllm'
    with pytest.raises(ConfigError, match=r"sampling.engine = 'fast' is invalid: allowed one of 'auto', 'hf', 'vllm'"): SamplingConfig(engine='fast')
    with pytest.raises(ConfigError, match="sampling.engine_dtype"): SamplingConfig(engine_dtype='int8')
    p = GenParams.sampling(SamplingConfig(n_responses=3, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=9, batch_size=4))
    assert (p.n, p.temperature, p.top_p, p.max_new_tokens, p.seed, p.greedy, p.batch_size) == (3, 0.7, 0.9, 5, 9, False, 4)
    with pytest.raises(ValueError, match="greedy decoding gives one response per prompt: n=2 must be 1"): GenParams(n=2, greedy=True)
    with pytest.raises(ValueError, match="top_p=1.5"): GenParams(top_p=1.5)
    assert resolve_engine_kind('hf') == 'hf'
    with pytest.raises(ValueError, match="engine 'gpu' is unknown"): resolve_engine_kind('gpu')

def test_make_engine_vllm_without_vllm_says_what_to_do():
    import importlib.util
    if importlib.util.find_spec('vllm') is not None: pytest.skip("vLLM is installed here: tests/vllm test the real engine")
    import cream_nb.models.engine as E
    from cream_nb.models.vllm import VLLMEngine          # importing it registers the backend; vLLM itself is not imported
    assert E.BACKENDS['vllm'] is VLLMEngine
    eng = make_engine('vllm', base_dir='x', tokenizer=None, resolve=None)
    with pytest.raises(ImportError, match="sampling.engine='vllm' needs vLLM, which is not importable here"): eng._load('x')
    saved = E.BACKENDS.pop('vllm')                        # a backend nobody imported: the error names the module to import
    try:
        with pytest.raises(ImportError, match="no registered backend: import cream_nb.models.vllm"): make_engine('vllm', base_dir='x', tokenizer=None, resolve=None)
    finally: E.BACKENDS['vllm'] = saved
    assert resolve_engine_kind('auto') == 'hf'


# ---- the nucleus cut -----------------------------------------------------------------------------------------
def _naive_mask(probs, top_p):
    sp, si = probs.sort(-1, descending=True)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, si, _keep_sorted(sp, top_p))

def _mask(probs, top_p, ks):
    m = torch.zeros_like(probs, dtype=torch.bool)
    for rows, si, kp in nucleus_keep(probs, top_p, ks): m[rows] = m[rows].scatter(1, si, kp > 0)
    return m

def test_nucleus_cut_equals_the_sorted_cut_and_transformers():
    from transformers.generation.logits_process import TopPLogitsWarper
    g = torch.Generator().manual_seed(1)
    for trial in range(100):
        l64 = torch.randn(8, 49152 if trial < 3 else 500, generator=g, dtype=torch.float64) * (1 + trial % 6)
        if trial % 4 == 0: l64 = l64.round()                           # ties everywhere
        probs = l64.float().softmax(-1)
        for top_p in (0.05, 0.5, 0.8, 0.95, 0.999):
            want = _naive_mask(probs, top_p)
            for ks in ((64, 1024), (1,), (3, 7), ()):
                assert torch.equal(_mask(probs, top_p, ks), want), (trial, top_p, ks)
            if trial % 4:   # rows without ties: transformers' warper cuts the same tokens (in float64, so that its
                # ascending cumulative sums and our descending ones do not round differently at the cut)
                sp = l64.sort(-1).values
                rows = ~(sp[:, 1:] == sp[:, :-1]).any(-1)
                hf = TopPLogitsWarper(top_p)(None, l64.clone()) > float('-inf')
                assert rows.sum() >= 4 and torch.equal(_naive_mask(l64.softmax(-1), top_p)[rows], hf[rows]), (trial, top_p)
    # the edge cases by hand: ties at the cut are kept, one certain token, impossible tokens never kept
    p = torch.tensor([[0.4, 0.2, 0.2, 0.2, 0.0], [1.0, 0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25, 0]])
    assert _mask(p, 0.5, (2,)).tolist() == [[True, True, True, True, False], [True] + [False] * 4, [True] * 4 + [False]]
    assert _mask(p, 0.4, (2,)).tolist()[0] == [True, False, False, False, False]


# ---- greedy decoding is exact --------------------------------------------------------------------------------
def test_greedy_equals_model_generate_fp32(tiny):
    model, tok = tiny
    ps = _prompts()
    want = _generate_greedy(model, tok, ps, 20)
    got = HFEngine(model, tok, dtype='float32').generate(None, ps, GenParams(greedy=True, max_new_tokens=20, batch_size=5))
    assert [r['responses'][0] for r in got] == want[0]
    assert [r['response_token_ids'][0] for r in got] == want[1]
    # batch size does not change greedy answers (rows are independent); nor does repeating the prefill n times
    small = HFEngine(model, tok, dtype='float32').generate(None, ps, GenParams(greedy=True, max_new_tokens=20, batch_size=2))
    assert small == got
    ids = [chat_prompt_ids(tok, p['messages']) for p in ps]
    stop = end_token_ids(model, tok) + [tok.pad_token_id]
    gp = GenParams(greedy=True, max_new_tokens=20); gp.n = 3
    one = decode(model, ids, GenParams(greedy=True, max_new_tokens=20), stop, tok.pad_token_id)
    assert torch.equal(decode(model, ids, gp, stop, tok.pad_token_id), one.repeat_interleave(3, 0))

def test_greedy_lora_checkpoints_equal_model_generate(lora):
    pm, tok = lora
    ps = _prompts()
    gp = GenParams(greedy=True, max_new_tokens=12)
    answers = {}
    for name in ('m0', 'm1'):
        with use_model(pm, name): want = _generate_greedy(pm, tok, ps, 12)[0]
        exact = HFEngine(pm, tok, dtype='float32', merge=False).generate(name, ps, gp)
        assert [r['responses'][0] for r in exact] == want, name
        merged = HFEngine(pm, tok, dtype='float32').generate(name, ps, gp)   # merged weights round differently
        assert sum(r['responses'][0] == w for r, w in zip(merged, want)) >= len(want) - 1, name
        answers[name] = want
    assert answers['m0'] != answers['m1']   # the adapter is applied


# ---- sampling: seeds and distributions -----------------------------------------------------------------------
def test_same_seed_same_samples_other_seed_other(lora):
    pm, tok = lora
    eng = HFEngine(pm, tok)
    p = GenParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=8, seed=4, batch_size=2)
    a = eng.generate('m1', _prompts(), p)
    assert eng.generate('m1', _prompts(), p) == a
    assert HFEngine(pm, tok).generate('m1', _prompts(), p) == a     # a new engine, the same draws
    assert eng.generate('m1', _prompts(), GenParams(**{**p.__dict__, 'seed': 5})) != a
    assert [len(r['responses']) for r in a] == [3] * 5
    assert len({tuple(x) for r in a for x in r['response_token_ids']}) == 15

def _first_token_counts(model, tok, params, draws, per_call=500):
    ids = [chat_prompt_ids(tok, [{'role': 'user', 'content': 'Name a colour.'}])]
    counts = torch.zeros(len(tok), dtype=torch.long)
    for s in range(draws // per_call):
        p = GenParams(**{**params.__dict__, 'n': per_call, 'max_new_tokens': 1})
        out = decode(model, ids, p, [], tok.pad_token_id, torch.Generator().manual_seed(s))
        counts += torch.bincount(out[:, 0], minlength=len(tok))
    with torch.inference_mode(): logits = model(torch.tensor(ids)).logits[0, -1]
    return counts, logits

def _binned_chisquare(counts, probs, bins=20):
    "Chi-square p-value of `counts` against `probs`, tokens grouped into `bins` groups of about equal probability mass."
    from scipy.stats import chisquare
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    group = torch.clamp((cum / cum[-1] * bins).ceil().long() - 1, 0, bins - 1)
    obs = torch.zeros(bins).index_add_(0, group, counts[order].float())
    exp = torch.zeros(bins, dtype=torch.float64).index_add_(0, group, probs[order].double()) * counts.sum()
    keep = exp > 0
    return chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue

def test_sampled_tokens_follow_the_softmax(tiny):
    "First-token frequencies of 6,000 draws match softmax(logits / T) (chi-square over 20 equal-mass bins), cut by top_p."
    model, tok = tiny
    # T = 1, top_p = 1: the tiny model's own distribution (nearly flat over 49,152 tokens)
    counts, logits = _first_token_counts(model, tok, GenParams(temperature=1.0, top_p=1.0), 6000)
    assert _binned_chisquare(counts, logits.float().softmax(-1)) > 1e-3
    # T = 1/8 sharpens it (the top token ~6%, half the mass on ~4,300 tokens); and a nucleus of half the mass
    for top_p in (1.0, 0.5):
        counts, logits = _first_token_counts(model, tok, GenParams(temperature=0.125, top_p=top_p), 6000)
        probs = (logits.float() / 0.125).softmax(-1)
        cut = probs * _naive_mask(probs[None], top_p)[0]
        assert counts[cut == 0].sum() == 0 and (cut > 0).sum() > 100
        assert _binned_chisquare(counts, cut / cut.sum()) > 1e-3
    # a wrong distribution is caught: the T = 1/8 draws against the T = 1 probabilities
    assert _binned_chisquare(counts, logits.float().softmax(-1)) < 1e-6


# ---- LoRA weights are left as they were; one copy per checkpoint ----------------------------------------------
def test_generation_leaves_adapter_weights_and_logps_unchanged(lora):
    pm, tok = lora
    x = torch.tensor([chat_prompt_ids(tok, _prompts(1)[0]['messages'])])
    sd = {k: v.clone() for k, v in pm.state_dict().items()}
    grads = {n: p.requires_grad for n, p in pm.named_parameters()}
    with torch.no_grad():
        with use_model(pm, 'm1'): before_m1 = pm(x).logits.clone()
        with use_model(pm, 'm0'): before_m0 = pm(x).logits.clone()
    eng = HFEngine(pm, tok)                                     # default: a merged bf16 copy where this CPU has bf16
    for name in ('m0', 'm1'): eng.generate(name, _prompts(), GenParams(n=2, max_new_tokens=6, batch_size=2))
    eng.release()
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in sd.items())
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == grads
    assert pm.active_adapter == 'm1'
    with torch.no_grad():
        with use_model(pm, 'm1'): assert torch.equal(pm(x).logits, before_m1)
        with use_model(pm, 'm0'): assert torch.equal(pm(x).logits, before_m0)

def test_served_by_a_callable_copy_made_once_per_checkpoint(lora):
    pm, tok = lora
    served = []
    @contextlib.contextmanager
    def serve(name):
        served.append(name)
        with use_model(pm, name) as m: yield m
    eng = HFEngine(serve, tok, dtype='float32')
    p = GenParams(n=2, max_new_tokens=4, batch_size=2)
    a = eng.generate('m1', _prompts(), p); eng.generate('m1', _prompts(), p); eng.generate('m0', _prompts(), p)
    assert served == ['m1', 'm0']                               # m1's merged copy was reused by the second call
    eng.release(); eng.generate('m1', _prompts(), p)
    assert served == ['m1', 'm0', 'm1']
    assert HFEngine(pm, tok, dtype='float32').generate('m1', _prompts(), p) == a


# ---- nothing else calls model.generate -----------------------------------------------------------------------
def test_library_generates_only_through_engines():
    "Every `.generate(` call in cream_nb/ is an engine's (or vLLM's `llm.generate` inside the vLLM engine)."
    bad = []
    for f in sorted((ROOT/'cream_nb').glob('*.py')):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'generate':
                recv = ast.unparse(node.func.value)
                if not re.fullmatch(r'(self|engine|eng|self\.engine|self\.run\.engine|run\.engine|Engine)', recv) and not \
                   (f.name == 'vllm_engine.py' and re.search(r'llm$', recv)):
                    bad.append(f"{f.name}:{node.lineno}: {recv}.generate(...)")
    assert not bad, "generation must go through cream_nb.models.engine: " + '; '.join(bad)


def test_copy_runs_its_own_forward_after_a_trainer_wrapped_it(lora):
    "accelerate leaves `model.forward` wrapped as an instance attribute; the generation copy must not call the original."
    from cream_nb.models.engine import generation_copy
    pm, tok = lora
    base = pm.get_base_model()
    orig, calls = base.forward, []
    def wrapped(*a, **k): calls.append(1); return orig(*a, **k)
    base.forward = wrapped
    try:
        g = generation_copy(pm, torch.float32)
        with torch.no_grad(): g(torch.tensor([[1, 2, 3]]))
        assert calls == [] and 'forward' not in vars(g)
    finally: del base.forward
