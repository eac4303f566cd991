"Rewards: log-probs against the naive computation, forward passes per iteration, caching, the judge and the oracle."
import math
import numpy as np
from pathlib import Path
import pytest, torch
from hypothesis import given, settings, strategies as st
from cream_nb.core.config import ModelConfig, RewardConfig
from cream_nb.core.artifacts import read_jsonl
from cream_nb.models.loading import add_adapter, load_model, use_model
from cream_nb.stages import rewards as R
from cream_nb.stages import judge as judge_
from cream_nb.models import logprobs as logprobs_
from cream_nb.models import precision as precision_

@pytest.fixture(scope='module')
def tiny():
    return load_model('tiny')

@pytest.fixture(scope='module')
def tiny64():
    return load_model('tiny', dtype=torch.float64)

@pytest.fixture(scope='module')
def adapters(tiny):
    "A PeftModel with adapters m1, m2, m3 on the tiny base, LoRA weights random so all four models differ."
    model = load_model('tiny')[0]
    mcfg = ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0)
    for name in ('m1', 'm2', 'm3'): model = add_adapter(model, name, mcfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_B' in n: p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()

def naive(model, tok, messages, response):
    "log_softmax + gather over the whole unpadded sequence, summed over the response tokens."
    ids, n = logprobs_.build_sequence(tok, messages, response)
    x = torch.tensor([ids])
    with torch.no_grad(): lp = model(x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
    return lp[n - 1:].double().sum().item(), len(ids) - n

PROMPTS = [{'id': f'p{i}', 'messages': [{'role': 'user', 'content': q}]} for i, q in
           enumerate(['Hi', 'Describe the water cycle in detail, step by step, for a child.', 'Why?', '2+2?'])]
SAMPLES = [{'prompt_id': 'p2', 'responses': ['Because.', 'It depends on what you are asking about, really.', '']},
           {'prompt_id': 'p0', 'responses': ['Hello!', 'Hi there, how can I help?', 'Hey']},
           {'prompt_id': 'p3', 'responses': ['4', 'Four', 'The answer is 4.']},
           {'prompt_id': 'p1', 'responses': ['Water evaporates, forms clouds, and falls as rain.', 'Rain.', 'Evaporation']}]

# ---- log-probs ------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 6), v=st.integers(2, 50), seed=st.integers(0, 10_000), half=st.booleans())
def test_selective_log_softmax_equals_log_softmax_gather(b, s, v, seed, half):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, v, generator=g) * 5
    if half: logits = logits.bfloat16()
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[torch.rand(b, s, generator=g) < 0.3] = -100
    want = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    got = logprobs_.selective_log_softmax(logits, labels)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5, rtol=0)

@pytest.mark.parametrize('bs', [1, 2, 5, 16])
def test_sequence_logps_equal_naive_to_1e5(tiny64, bs):
    model, tok = tiny64
    msgs = [p['messages'] for s in SAMPLES for p in PROMPTS if p['id'] == s['prompt_id'] for _ in s['responses']]
    resps = [r for s in SAMPLES for r in s['responses']]
    lp, nt = logprobs_.sequence_logps(model, tok, msgs, resps, batch_size=bs)
    want = [naive(model, tok, m, r) for m, r in zip(msgs, resps)]
    assert lp.dtype == torch.float64 and lp.shape == (12,)
    assert torch.allclose(lp, torch.tensor([a for a, _ in want], dtype=torch.float64), atol=1e-5, rtol=0)
    assert nt.tolist() == [b for _, b in want]
    assert nt.tolist()[2] == 1                              # the empty response still scores its end-of-turn token

# ---- each prompt once: the shared prefix ------------------------------------------------------------
@pytest.mark.parametrize('bs', [1, 4, 7, 12])
def test_shared_prefix_equals_naive_float64(tiny64, bs):
    "Groups of 1 to 3 continuations of 1 to 9 tokens after prefixes of 1 to 6 tokens, against each sequence alone."
    model, tok = tiny64
    pre = [[5, 6, 7, 8, 9, 10], [11], [13, 14, 15, 16]]
    conts = [[[20, 21, 22], [23], [24, 25, 26, 27, 28, 29, 30, 31, 32]], [[40, 41]], [[50], [51, 52], [53, 54, 55, 56]]]
    got = logprobs_.shared_prefix_logps(model, pre, conts, tok.pad_token_id, batch_size=bs)
    for p, cs, g in zip(pre, conts, got):
        for c, v in zip(cs, g.tolist()):
            x = torch.tensor([p + c])
            with torch.no_grad(): lp = model(x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
            assert abs(lp[len(p) - 1:].sum().item() - v) < 1e-9

@pytest.mark.parametrize('which', ['plain', 'm1', 'm2'])
@pytest.mark.parametrize('bs', [2, 5, 12])
def test_shared_prefix_scoring_equals_plain_batched_forward_fp32(tiny, adapters, which, bs):
    "score_samples' default (each prompt once) = the plain batched forward to 1e-4 in fp32, plain model and LoRA adapters."
    model, tok = tiny
    m = model if which == 'plain' else adapters
    import contextlib
    with (use_model(adapters, which) if which != 'plain' else contextlib.nullcontext()):
        assert next(m.parameters()).dtype == torch.float32
        shared = R.score_samples(m, tok, PROMPTS, SAMPLES, batch_size=bs)
        plain = R.score_samples(m, tok, PROMPTS, SAMPLES, batch_size=bs, share_prefix=False)
    assert list(shared) == list(plain)
    for pid in plain:
        assert shared[pid]['n_tokens'] == plain[pid]['n_tokens']
        assert max(abs(a - b) for a, b in zip(shared[pid]['logps'], plain[pid]['logps'])) < 1e-4
    assert len({len(r) for s in SAMPLES for r in s['responses']}) > 5       # responses of many lengths

def test_shared_prefix_bad_input(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match='2 prefixes but 1 continuation lists'): logprobs_.shared_prefix_logps(model, [[1], [2]], [[[3]]], 0)
    with pytest.raises(ValueError, match='group 0: the prefix and every continuation need at least one token'):
        logprobs_.shared_prefix_logps(model, [[1]], [[[3], []]], 0)

def test_sequence_logps_float32_multi_turn_and_records(tiny):
    model, tok = tiny
    conv = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
            {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Name a fruit.'}]
    prompts = [conv, {'id': 'x', 'messages': PROMPTS[1]['messages']}]
    lp, nt = logprobs_.sequence_logps(model, tok, prompts, ['Apple', 'Water goes up and comes down.'], batch_size=2)
    want = [naive(model, tok, conv, 'Apple'), naive(model, tok, PROMPTS[1]['messages'], 'Water goes up and comes down.')]
    for got, (w, n), k in zip(lp.tolist(), want, nt.tolist()):
        assert abs(got - w) <= 1e-6 * abs(w) and k == n

def test_build_sequence_is_the_sampling_prompt_then_response_then_end_of_turn(tiny):
    from cream_nb.models.engine import chat_prompt_ids
    _, tok = tiny
    ids, n = logprobs_.build_sequence(tok, PROMPTS[0]['messages'], 'Hello!')
    assert ids[:n] == chat_prompt_ids(tok, PROMPTS[0]['messages'])
    assert ids[n:] == tok('Hello!', add_special_tokens=False)['input_ids'] + [tok.convert_tokens_to_ids('<|im_end|>')]

def test_bad_inputs_name_what_is_wrong(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match='2 prompts but 1 responses'): logprobs_.sequence_logps(model, tok, [[], []], ['a'])
    with pytest.raises(ValueError, match="prompt 0 is a dict without 'messages'"): logprobs_.sequence_logps(model, tok, [{'id': 'a'}], ['a'])
    with pytest.raises(ValueError, match="sample 1 must be a record with 'prompt_id' and 'responses'"):
        R.score_samples(model, tok, PROMPTS, [SAMPLES[0], {'prompt_id': 'p0'}])

# ---- rewards ----------------------------------------------------------------------------------------
def test_implicit_reward_and_normalized_likelihood_by_hand():
    assert R.implicit_reward(torch.tensor([-10.0, -2.5]), [-12.0, -2.0]).tolist() == [2.0, -0.5]
    assert R.normalized_likelihood([-9.0, -1.0], torch.tensor([3, 4])).tolist() == [-3.0, -0.25]

def test_iteration_rewards_by_hand():
    lp = lambda *v: {'a': {'logps': list(v), 'n_tokens': [2, 4]}}
    by = {'m2': lp(-5.0, -9.0), 'm1': lp(-6.0, -7.0), 'm0': lp(-4.0, -8.0)}
    assert R.iteration_rewards(by, 2) == {'a': {'current': [1.0, -2.0], 'previous': [-2.0, 1.0]}}
    assert R.iteration_rewards({'m1': by['m1'], 'm0': by['m0']}, 1) == {'a': {'current': [-2.0, 1.0], 'previous': [-2.0, -2.0]}}
    with pytest.raises(ValueError, match=r"prompt 'b' has log-probs of m2 but not"):
        R.iteration_rewards({**by, 'm2': {**by['m2'], 'b': by['m2']['a']}}, 2)

# ---- forward passes per iteration -------------------------------------------------------------------
def _count(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda mod, args: calls.append(1))

@pytest.mark.parametrize('t, models', [(1, ['m1', 'm0']), (2, ['m2', 'm1', 'm0']), (3, ['m3', 'm2', 'm1'])])
def test_each_model_scored_once_per_iteration(adapters, tiny, tmp_path, t, models):
    _, tok = tiny
    bs = 6                                                                     # whole prompts per batch: 4 prompts x 3 responses
    B = 2 * math.ceil(sum(len(s['responses']) for s in SAMPLES) / bs)          # -> 2 batches per model, each a prefill + a pass over the responses
    calls, hook = _count(adapters)
    try:
        out = R.iteration_logps(adapters, tok, t, PROMPTS, SAMPLES, tmp_path, batch_size=bs)
        assert len(calls) == len(models) * B                                   # 3B (2B when t = 1), not 4B
        assert list(out) == models
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f'logps_{m}.jsonl' for m in models)
        R.iteration_logps(adapters, tok, t, PROMPTS, SAMPLES, tmp_path, batch_size=bs)
        assert len(calls) == len(models) * B                                   # a second call scores nothing
        (tmp_path/f'logps_{models[1]}.jsonl').unlink()
        again = R.iteration_logps(adapters, tok, t, PROMPTS, SAMPLES, tmp_path, batch_size=bs)
        assert len(calls) == (len(models) + 1) * B and again == out            # only the missing model is rescored
    finally: hook.remove()
    # the stored numbers are each model's own log-probs: pi_t's are the DPO reference log-probs
    for name in models:
        with use_model(adapters, name):
            w, n = naive(adapters, tok, PROMPTS[1]['messages'], SAMPLES[3]['responses'][0])
        assert abs(out[name]['p1']['logps'][0] - w) <= 1e-6 * abs(w) and out[name]['p1']['n_tokens'][0] == n
    assert len({out[m]['p1']['logps'][0] for m in models}) == len(models)      # the models really differ
    rec = read_jsonl(tmp_path/f'logps_m{t}.jsonl')
    assert [r['prompt_id'] for r in rec] == [s['prompt_id'] for s in SAMPLES]
    assert rec[0]['logps'] == out[f'm{t}']['p2']['logps'] and rec[0]['n_tokens'] == out[f'm{t}']['p2']['n_tokens']

def test_stale_logps_file_is_recomputed(adapters, tiny, tmp_path):
    _, tok = tiny
    R.iteration_logps(adapters, tok, 1, PROMPTS, SAMPLES, tmp_path, batch_size=12)
    calls, hook = _count(adapters)
    try:
        resampled = [dict(SAMPLES[0], responses=['Other', 'texts', 'now'])] + SAMPLES[1:]
        R.iteration_logps(adapters, tok, 1, PROMPTS, resampled, tmp_path, batch_size=12)
        assert len(calls) == 2 * 2                                             # 2 models, one batch each: prefill + responses
        R.iteration_logps(adapters, tok, 1, PROMPTS, SAMPLES[:2], tmp_path, batch_size=12)     # fewer prompts
        assert len(calls) == 4 * 2
    finally: hook.remove()

def test_iteration_logps_with_a_custom_switch(tiny, tmp_path):
    "Full checkpoints (no adapters): `switch` hands over a different model for each name."
    _, tok = tiny
    from cream_nb.models.loading import tiny_model
    import contextlib
    loaded = []
    @contextlib.contextmanager
    def switch(name):
        loaded.append(name)
        yield tiny_model(len(tok), seed=int(name[1:])).eval()
    out = R.iteration_logps(None, tok, 2, PROMPTS, SAMPLES, tmp_path, batch_size=6, switch=switch)
    assert loaded == ['m2', 'm1', 'm0']
    m1 = tiny_model(len(tok), seed=1).eval()
    w, _ = naive(m1, tok, PROMPTS[0]['messages'], 'Hey')
    assert abs(out['m1']['p0']['logps'][2] - w) <= 1e-6 * abs(w)
    rw = R.iteration_rewards(out, 2)
    assert rw['p0']['current'][2] == pytest.approx(out['m2']['p0']['logps'][2] - out['m1']['p0']['logps'][2], abs=1e-9)

# ---- judge and oracle -------------------------------------------------------------------------------
@pytest.mark.parametrize('text, score', [('Good.\nScore: 3', 3.0), ('Score: 5/5', 5.0), ('**Score:** 1', 1.0),
                                         ('score:2 then Score: 4', 4.0), ('Score: 6', None), ('Score: -2', None),
                                         ('five points', None), ('', None)])
def test_parse_judge_score(text, score):
    assert judge_.parse_judge_score(text) == score

def test_judge_prompt_has_the_five_criteria_and_the_score_format():
    p = judge_.judge_prompt('Q?', 'A.')
    assert sum(line.startswith('- Add ') for line in p.splitlines()) == 5
    assert 'User: Q?\n<response>A.</response>' in p and '"Score: <total points>"' in p

def test_judge_rewards_counts_unparseable_and_never_scores_them_0(tiny, monkeypatch):
    model, tok = tiny
    seen = {}
    def fake(m, t, recs, cfg, greedy=False, progress=True, engine=None, checkpoint=None):
        seen.update(greedy=greedy, n=cfg.max_new_tokens, bs=cfg.batch_size, first=recs[0], engine=engine, checkpoint=checkpoint)
        return [{'prompt_id': r['id'], 'responses': [f'Score: {i % 7}']} for i, r in enumerate(recs)]
    monkeypatch.setattr(judge_, 'sample_responses', fake)
    scores, stats = judge_.judge_rewards(model, tok, PROMPTS, SAMPLES, RewardConfig(batch_size=3, judge_max_new_tokens=9))
    assert seen['greedy'] and (seen['n'], seen['bs']) == (9, 3) and seen['engine'] is seen['checkpoint'] is None
    assert seen['first']['messages'][0]['content'] == judge_.judge_prompt('Why?', 'Because.')
    assert scores == {'p2': [0.0, 1.0, 2.0], 'p0': [3.0, 4.0, 5.0], 'p3': [None, 0.0, 1.0], 'p1': [2.0, 3.0, 4.0]}
    assert (stats['n'], stats['parsed'], stats['unparseable']) == (12, 11, 1)
    assert stats['mean_score'] == pytest.approx(25 / 11) and stats['histogram']['0'] == 2

def test_judge_rewards_on_the_tiny_model(tiny):
    model, tok = tiny
    scores, stats = judge_.judge_rewards(model, tok, PROMPTS, SAMPLES[:2], RewardConfig(batch_size=4, judge_max_new_tokens=6), progress=False)
    assert [len(v) for v in scores.values()] == [3, 3] and stats['n'] == 6
    assert stats['parsed'] + stats['unparseable'] == 6
    assert all(len(t) for v in stats['judgements'].values() for t in v)

def test_judge_score_tokens_follow_the_tokenizer(tiny):
    _, tok = tiny
    pre, digits = judge_.judge_score_tokens(tok)
    assert tok.convert_ids_to_tokens(pre) == ['Score', ':', 'Ġ'] and [tok.decode([d]) for d in digits] == list('012345')
    for k in range(6): assert tok(f'Score: {k}', add_special_tokens=False)['input_ids'] == pre + [digits[k]]
    merged = lambda text, add_special_tokens=False: {'input_ids': [7, 8] + ([99] if text.endswith('3') else [9, ord(text[-1])])}
    with pytest.raises(ValueError, match=r"'Score: ' \+ 3 tokenizes as \[7, 8, 99\], not the prefix \[7, 8, 9\] \+ one token"):
        judge_.judge_score_tokens(merged)

def hand_expected(model, tok, messages, response):
    "One unpadded forward pass: softmax over the vocabulary after 'Score: ', digits renormalised, sum k p(k) in numpy."
    import numpy as np
    judge = [{'role': 'user', 'content': judge_.judge_prompt(messages[-1]['content'], response)}]
    ids = tok.apply_chat_template(judge, add_generation_prompt=True, tokenize=False) + 'Score: '
    x = torch.tensor([tok(ids, add_special_tokens=False)['input_ids']])
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(6)]
    with torch.no_grad(): p = model(x).logits[0, -1].double().softmax(-1).numpy()
    q = p[digits]
    return float((np.arange(6) * q).sum() / q.sum()), float(q.sum()), list(q / q.sum())

def test_expected_judge_score_against_a_hand_computation(tiny):
    model, tok = tiny
    cfg = RewardConfig(batch_size=4, judge_scoring='expected')
    scores, stats = judge_.judge_rewards(model, tok, PROMPTS, SAMPLES, cfg, progress=False)
    by_id = {p['id']: p['messages'] for p in PROMPTS}
    want = {s['prompt_id']: [hand_expected(model, tok, by_id[s['prompt_id']], r) for r in s['responses']] for s in SAMPLES}
    for pid, xs in want.items():
        assert scores[pid] == pytest.approx([e for e, _, _ in xs], abs=1e-5)
        for row, (_, _, q) in zip(stats['judgements'][pid], xs): assert row == pytest.approx(q, abs=1e-6)   # p(0..5), renormalised
    mass = [m for xs in want.values() for _, m, _ in xs]
    assert (stats['scoring'], stats['n'], stats['parsed'], stats['unparseable'], stats['parse_rate']) == ('expected', 12, 12, 0, 1.0)
    assert stats['digit_mass_mean'] == pytest.approx(np.mean(mass), abs=1e-6) and stats['digit_mass_min'] == pytest.approx(min(mass), abs=1e-6)
    flat = [e for xs in want.values() for e, _, _ in xs]
    assert stats['mean_score'] == pytest.approx(np.mean(flat), abs=1e-5) and stats['sd_score'] == pytest.approx(np.std(flat), abs=1e-5)
    assert stats['prompts'] == 4 and stats['prompts_fully_ranked'] == sum(len(set(v)) == len(v) for v in scores.values())
    assert stats['histogram'] == {str(k): sum(round(x) == k for x in flat) for k in range(6)}

def test_expected_judge_score_is_deterministic_and_batch_independent(tiny):
    model, tok = tiny
    a = judge_.judge_expected_scores(model, tok, PROMPTS, SAMPLES, batch_size=3)[0]
    assert judge_.judge_expected_scores(model, tok, PROMPTS, SAMPLES, batch_size=3)[0] == a   # bit for bit
    b = judge_.judge_expected_scores(model, tok, PROMPTS, SAMPLES, batch_size=12)[0]           # other padding, same scores
    assert all(b[k] == pytest.approx(a[k], abs=1e-5) for k in a)

def test_generate_judge_records_its_parse_rate(tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(judge_, 'sample_responses', lambda m, t, recs, cfg, **kw:
                        [{'prompt_id': r['id'], 'responses': ['Score: 2' if i % 4 == 0 else 'no score']} for i, r in enumerate(recs)])
    _, stats = judge_.judge_rewards(model, tok, PROMPTS, SAMPLES, RewardConfig(batch_size=3))
    assert (stats['scoring'], stats['parsed'], stats['n'], stats['parse_rate']) == ('generate', 3, 12, 0.25)

def test_oracle_rewards():
    q = lambda text: [{'role': 'user', 'content': text}]
    prompts = [dict(id='g', messages=q('1+1?'), task='gsm8k', choices=[], answer='2'),
               dict(id='o', messages=q('Say hi'), task='oasst1', choices=[], answer=None),
               dict(id='s', messages=q('Pick'), task='siqa', choices=[{'label': l, 'text': l} for l in 'ABC'], answer='C')]
    samples = [{'prompt_id': 's', 'responses': ['Answer: C', 'Answer: A', 'no idea']},
               {'prompt_id': 'g', 'responses': ['1+1 = 2. Answer: 2', 'Answer: 2.0', 'Answer: 3']},
               {'prompt_id': 'o', 'responses': ['hi', 'hello', 'hey']}]
    assert R.oracle_rewards(prompts, samples) == {'s': [1.0, 0.0, 0.0], 'g': [1.0, 1.0, 0.0], 'o': [None, None, None]}

def test_sequence_logps_left_padding_with_absolute_positions(tiny):
    "GPT-2 learns absolute position embeddings: padded rows are exact only because position ids skip the padding."
    from transformers import GPT2Config, GPT2LMHeadModel
    _, tok = tiny
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=512)).double().eval()
    msgs = [PROMPTS[0]['messages'], PROMPTS[1]['messages'], PROMPTS[2]['messages']]
    resps = ['Hello there', 'Water', '']
    lp, nt = logprobs_.sequence_logps(model, tok, msgs, resps, batch_size=3)
    want = [naive(model, tok, m, r) for m, r in zip(msgs, resps)]
    assert torch.allclose(lp, torch.tensor([a for a, _ in want], dtype=torch.float64), atol=1e-5, rtol=0)
    assert nt.tolist() == [b for _, b in want]

# ---- precision -----------------------------------------------------------------------------------------
def test_resolve_precision(monkeypatch):
    assert precision_.resolve_precision('eval.precision', 'fp32') == 'fp32'
    assert precision_.resolve_precision('eval.precision', 'auto') == ('bf16' if precision_.bf16_matmuls() and precision_.BF16_AUTO['eval.precision'] else 'fp32')
    with pytest.raises(ValueError, match="reward.precision must be one of 'fp32', 'bf16', 'auto', got 'fp16'"):
        precision_.resolve_precision('reward.precision', 'fp16')
    monkeypatch.setattr(precision_, 'bf16_matmuls', lambda device='cpu': False)        # a machine without bf16 matmuls
    assert precision_.resolve_precision('eval.precision', 'auto') == 'fp32'
    with pytest.raises(RuntimeError, match=r"^eval.precision='bf16' needs bf16 matmul instructions .* set eval.precision to 'fp32' or 'auto'$"):
        precision_.resolve_precision('eval.precision', 'bf16')
    monkeypatch.setattr(precision_, 'bf16_matmuls', lambda device='cpu': True)
    monkeypatch.setitem(precision_.BF16_AUTO, 'eval.precision', True)
    assert precision_.resolve_precision('eval.precision', 'auto') == 'bf16'
    monkeypatch.setitem(precision_.BF16_AUTO, 'eval.precision', False)
    assert precision_.resolve_precision('eval.precision', 'auto') == 'fp32'

@pytest.mark.parametrize('share', [True, False])
def test_bf16_scoring_equals_naive_bf16_forward(adapters, tiny, share):
    "bf16 matmuls with fp32 logits: both scoring paths = one unpadded forward under matmul_precision, and the head stays fp32."
    _, tok = tiny
    msgs = [p['messages'] for s in SAMPLES for p in PROMPTS if p['id'] == s['prompt_id'] for _ in s['responses']]
    resps = [r for s in SAMPLES for r in s['responses']]
    with use_model(adapters, 'm2'):
        want = []
        for m, r in zip(msgs, resps):
            ids, n = logprobs_.build_sequence(tok, m, r); x = torch.tensor([ids])
            with torch.no_grad(), precision_.matmul_precision(adapters, 'bf16'):
                logits = adapters(x).logits
                assert logits.dtype == torch.float32
                want.append(logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0][n - 1:].double().sum().item())
        got, _ = logprobs_.sequence_logps(adapters, tok, msgs, resps, batch_size=5, share_prefix=share, precision='bf16')
        fp32, _ = logprobs_.sequence_logps(adapters, tok, msgs, resps, batch_size=5)
    assert (got - torch.tensor(want, dtype=torch.float64)).abs().max() < 0.1        # bf16 matmuls of other shapes
    assert 0 < (got - fp32).abs().max() < 1.0                                       # bf16 really ran, and moved little
    assert 'forward' not in vars(adapters.get_output_embeddings())                 # the head is restored
