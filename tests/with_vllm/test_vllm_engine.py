"""VLLMEngine for real (vLLM's CPU build, in .venv-vllm): the adapter is applied and gives the hf engine's greedy
answers, N responses per prompt, seeds reproducible, adapters re-read when rewritten, release/re-create, full
checkpoints, and the embedded SmolLM2. One LLM serves the whole module where it can (each build costs ~10 s)."""
import dataclasses, time
from pathlib import Path
import pytest, torch

from cream_nb.core.config import ModelConfig
from cream_nb.models.engine import GenParams, HFEngine
from cream_nb.models.loading import _tiny_dir, embedded_model_dir, embedded_tokenizer_dir, load_adapter, load_model, load_tokenizer, lora_config
from cream_nb.models.vllm import VLLMEngine

QUESTIONS = ['What is 2+2?', 'Name a colour.', 'Say hello.', 'What is the capital of France?', 'Count to three.',
             'Why is the sky blue?', 'Give me a fruit.', 'What is 7 times 6?', 'Spell cat.', 'Who wrote Hamlet?',
             'What day comes after Monday?', 'Is ice cold?']
PROMPTS = [{'id': f'q{i}', 'messages': [{'role': 'user', 'content': q}]} for i, q in enumerate(QUESTIONS)]
GREEDY = GenParams(greedy=True, max_new_tokens=8)


def _tiny32(d:Path, tok):
    "A seeded tiny Llama with heads of 32 (vLLM's CPU attention has no head size 16, the `tiny` model's)."
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=128, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0); m = LlamaForCausalLM(cfg)
    m.save_pretrained(d); tok.save_pretrained(d)
    return d

def _adapter(base_dir, out:Path, seed:int, std:float=0.5, r:int=8):
    "A LoRA adapter on `base_dir` with random A and B (B is zero at init, which would leave the base unchanged)."
    import peft
    m, _ = load_model(str(base_dir), dtype='float32', device='cpu')
    p = peft.get_peft_model(m, lora_config(ModelConfig(lora_r=r, lora_alpha=2 * r)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, w in p.named_parameters():
            if 'lora_' in n: w.copy_(torch.randn(w.shape, generator=g) * std)
    p.save_pretrained(out)
    return out


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp('tiny32')
    tok = load_tokenizer(embedded_tokenizer_dir())
    base = _tiny32(d/'base', tok)
    return dict(dir=d, tok=tok, base=base, m1=_adapter(base, d/'m1', 1), m2=_adapter(base, d/'m2', 2))

@pytest.fixture(scope='module')
def engine(tiny):
    ckpts = {'m0': ('base', None), 'm1': ('lora', tiny['m1']), 'm2': ('lora', tiny['m2'])}
    e = VLLMEngine(tiny['base'], tiny['tok'], lambda name: ckpts[name], lora_rank=8, dtype='float32')
    e.ckpts = ckpts
    yield e
    e.close()

def _ids(recs): return [r['response_token_ids'][0] for r in recs]

def _hf_greedy(tiny, adapter=None):
    m, _ = load_model(str(tiny['base']), dtype='float32', device='cpu')
    if adapter is not None: m = load_adapter(m, adapter, 'm1')
    return HFEngine(m, tiny['tok'], dtype='float32').generate('m1' if adapter else 'm0', PROMPTS, GREEDY)


def test_adapter_applied_and_greedy_matches_hf_engine(engine, tiny):
    t0 = time.time()
    v0, v1 = engine.generate('m0', PROMPTS, GREEDY), engine.generate('m1', PROMPTS, GREEDY)
    print(f"first vLLM calls (with the LLM's build): {time.time() - t0:.1f} s")
    assert [r['prompt_id'] for r in v1] == [p['id'] for p in PROMPTS]
    differ = sum(a != b for a, b in zip(_ids(v0), _ids(v1)))
    assert differ >= 10, f"the adapter changed only {differ}/12 greedy answers: is it applied?"
    h0, h1 = _hf_greedy(tiny), _hf_greedy(tiny, tiny['m1'])
    for what, v, h in [('base', v0, h0), ('adapter', v1, h1)]:
        same = sum(a == b for a, b in zip(_ids(v), _ids(h)))
        print(f"{what}: {same}/12 greedy answers equal the hf engine's")
        assert same >= 9, f"{what}: only {same}/12 greedy answers equal the hf engine's"
    for r in v1: assert r['responses'][0] == tiny['tok'].decode(r['response_token_ids'][0], skip_special_tokens=False)


def test_n_responses_and_seeds(engine):
    p = GenParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5)
    a, b = engine.generate('m1', PROMPTS[:4], p), engine.generate('m1', PROMPTS[:4], p)
    assert a == b, "the same seed gave other samples"
    assert [len(r['responses']) for r in a] == [3] * 4 and all(len(r['response_token_ids']) == 3 for r in a)
    assert len({tuple(x) for r in a for x in r['response_token_ids']}) == 12, "samples of a call repeat each other"
    c = engine.generate('m1', PROMPTS[:4], dataclasses.replace(p, seed=6))
    assert sum(x != y for r, s in zip(a, c) for x, y in zip(r['response_token_ids'], s['response_token_ids'])) >= 10


def test_rewritten_adapter_is_reloaded_under_a_fresh_id(engine, tiny, tmp_path):
    "An adapter folder rewritten with other weights (a redone DPO stage) is served with its new weights."
    d = tmp_path/'m3'
    _adapter(tiny['base'], d, 1)
    engine.ckpts['m3'] = ('lora', d)
    first = engine.generate('m3', PROMPTS, GREEDY)
    assert _ids(first) == _ids(engine.generate('m1', PROMPTS, GREEDY))      # same weights as m1
    time.sleep(0.01); _adapter(tiny['base'], d, 2)                          # rewritten with m2's weights
    assert _ids(engine.generate('m3', PROMPTS, GREEDY)) == _ids(engine.generate('m2', PROMPTS, GREEDY))
    assert _ids(engine.generate('m2', PROMPTS, GREEDY)) != _ids(first)


def test_seeded_batch_above_the_cpu_step_budget(engine, tiny):
    """A seeded batch of more than 4,096 prompt tokens (vLLM's CPU step budget) samples, reproducibly: with chunked prefill on,
    vLLM split such a batch and failed rewinding a seeded CPU generator (`CPU Generator does not use offset`)."""
    words = ' '.join(['apple banana cherry'] * 100)
    prompts = [{'id': f'long{i}', 'messages': [{'role': 'user', 'content': f'{i}: {words}'}]} for i in range(16)]
    tok = tiny['tok']
    n_tokens = sum(len(tok(tok.apply_chat_template(p['messages'], add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids)
                   for p in prompts)
    assert n_tokens > 4096, n_tokens
    p = GenParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=4, seed=9)
    a = engine.generate('m1', prompts, p)
    assert [len(r['response_token_ids']) for r in a] == [2] * 16
    assert engine.generate('m1', prompts, p) == a
    assert engine._llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False


def test_release_tears_down_and_the_next_call_rebuilds(engine):
    p = GenParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=5, seed=1)
    before = engine.generate('m1', PROMPTS[:3], p)
    engine.release()
    assert engine._llm is None
    t0 = time.time()
    assert engine.generate('m1', PROMPTS[:3], p) == before
    print(f"rebuild + generate: {time.time() - t0:.1f} s")
    assert engine._llm is not None


def test_full_checkpoint_is_served_as_its_own_model(engine, tiny, tmp_path):
    "A full-mode checkpoint (here m1 merged into the weights) is loaded as a model and answers as m1 does."
    import peft
    m, _ = load_model(str(tiny['base']), dtype='float32', device='cpu')
    merged = peft.PeftModel.from_pretrained(m, str(tiny['m1'])).merge_and_unload()
    merged.save_pretrained(tmp_path/'full'); tiny['tok'].save_pretrained(tmp_path/'full')
    engine.ckpts['f1'] = ('full', tmp_path/'full')
    lora = _ids(engine.generate('m1', PROMPTS, GREEDY))
    full = _ids(engine.generate('f1', PROMPTS, GREEDY))
    assert engine._model_dir == str(tmp_path/'full')
    assert sum(a == b for a, b in zip(full, lora)) >= 9
    engine.generate('m0', PROMPTS[:1], GREEDY)
    assert engine._model_dir == str(tiny['base'])                          # back on the base


def test_evaluation_greedy_answers_through_vllm(engine, tiny):
    "Evaluation's greedy answers (cream_nb.stages.evaluate.greedy_answers on real test questions) given by the vLLM engine equal the hf path's."
    from cream_nb.core.config import EvalConfig
    from cream_nb.data.sources import load_test_set
    from cream_nb.stages.evaluate import greedy_answers
    recs = [dict(r) for r in load_test_set('arc_easy', source='offline', limit=6)]
    cfg = EvalConfig(max_new_tokens=8, batch_size=4)
    got = greedy_answers(None, tiny['tok'], recs, cfg, progress=False, engine=engine, checkpoint='m1')
    hf = load_adapter(load_model(str(tiny['base']), dtype='float32', device='cpu')[0], tiny['m1'], 'm1')
    want = greedy_answers(hf, tiny['tok'], recs, cfg, progress=False, engine=HFEngine(hf, tiny['tok'], dtype='float32'), checkpoint='m1')
    assert len(got) == 6 and all(isinstance(a, str) for a in got)
    assert sum(a == b for a, b in zip(got, want)) >= 5, f"{got} vs {want}"


def test_unservable_model_is_refused_before_loading(tiny):
    e = VLLMEngine(_tiny_dir(), tiny['tok'], lambda n: ('base', None))
    with pytest.raises(ValueError, match="head size 16.*sampling.engine='hf'"):
        e.generate('m0', PROMPTS[:1], GREEDY)
    assert e._llm is None


@pytest.mark.slow
def test_embedded_smollm2_greedy_matches_hf_engine(tmp_path):
    "The real model: vLLM's greedy answers (base and a small random adapter) equal the hf engine's on most questions."
    base = embedded_model_dir()
    tok = load_tokenizer(base)
    ad = _adapter(base, tmp_path/'m1', 3, std=0.02, r=8)
    e = VLLMEngine(base, tok, {'m0': ('base', None), 'm1': ('lora', ad)}.__getitem__, lora_rank=8, dtype='float32')
    p = GenParams(greedy=True, max_new_tokens=16)
    try:
        t0 = time.time()
        v0, v1 = e.generate('m0', PROMPTS[:6], p), e.generate('m1', PROMPTS[:6], p)
        print(f"SmolLM2: build + 2 x 6 greedy answers: {time.time() - t0:.1f} s")
    finally: e.close()
    m, _ = load_model(str(base), dtype='float32', device='cpu')
    h0 = HFEngine(m, tok, dtype='float32').generate('m0', PROMPTS[:6], p)
    h1 = HFEngine(load_adapter(m, ad, 'm1'), tok, dtype='float32').generate('m1', PROMPTS[:6], p)
    assert sum(a != b for a, b in zip(_ids(v0), _ids(v1))) >= 3, "the adapter did not change the answers"
    for what, v, h in [('base', v0, h0), ('adapter', v1, h1)]:
        same = sum(a == b for a, b in zip(_ids(v), _ids(h)))
        print(f"SmolLM2 {what}: {same}/6 greedy answers equal the hf engine's")
        assert same >= 5, f"SmolLM2 {what}: only {same}/6 greedy answers equal the hf engine's: {_ids(v)} vs {_ids(h)}"


@pytest.mark.slow
def test_tiny_loop_runs_with_the_vllm_engine(tiny, tmp_path, monkeypatch):
    "The whole tiny CREAM loop with sampling.engine='vllm' (on the tiny Llama with heads of 32): the iteration samples through vLLM."
    from cream_nb.models import vllm as V
    from cream_nb.core.config import apply_overrides, preset
    from cream_nb.core.artifacts import read_jsonl
    from cream_nb.runs.run import CreamRun
    from cream_nb.models.loading import CheckpointRegistry
    served = []
    orig = V.VLLMEngine._generate_batch
    def spy(self, prompt_ids, params, seed):
        served.append((self._lora.lora_path if self._lora else self._model_dir, params.greedy, params.n, len(prompt_ids)))
        return orig(self, prompt_ids, params, seed)
    monkeypatch.setattr(V.VLLMEngine, '_generate_batch', spy)
    cfg = apply_overrides(preset('tiny'), [f'model.name="{tiny["base"]}"', 'sampling.engine="vllm"'])
    assert cfg.loop.iterations == 2
    t0 = time.time()
    summary = CreamRun(cfg, tmp_path/'run', progress=False).run()
    print(f"tiny loop with vllm: {time.time() - t0:.1f} s, {len(served)} vLLM batches")
    reg = CheckpointRegistry(tmp_path/'run')
    sampled = [s for s in served if not s[1]]
    assert sampled and all(n == cfg.sampling.n_responses for _, _, n, _ in sampled)
    for t in (1, 2):   # iteration t samples M_t (its adapter) through vLLM; iteration 2 after DPO released the engine
        samples = read_jsonl(tmp_path/'run'/f'iter{t}'/'samples.jsonl')
        assert len(samples) == cfg.data.prompts_per_iteration and all(len(s['responses']) == cfg.sampling.n_responses for s in samples)
        assert sum(k for p, _, _, k in sampled if p == str(reg.path(f'm{t}'))) == len(samples), f"iteration {t} did not sample M{t} through vLLM"
    assert [it['model'] for it in summary['iterations']] == ['m2', 'm3'] and all(it['eval'] for it in summary['iterations'])
    assert summary
