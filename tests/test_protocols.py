"The two evaluation protocols ('generate', 'loglik') and the accuracy intervals (cream_nb.stages.evaluate)."
import json
import numpy as np
import pytest
import torch
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from cream_nb.core.config import ConfigError, EvalConfig
from cream_nb.data.sources import load_test_set
from cream_nb.stages.evaluate import accuracy_interval, task_metrics, evaluate, loglik_predictions
from cream_nb.data.answers import extract_answer, answers_match, MC_LABELS
from cream_nb.core.artifacts import read_jsonl
from cream_nb.models.loading import load_model
from cream_nb.models.logprobs import _batch_logps

MC = [t for t in EvalConfig().tasks if t in MC_LABELS]

@pytest.mark.parametrize('k,n,level', [(0, 1, .95), (1, 1, .95), (3, 4, .95), (0, 20, .95), (7, 20, .9), (20, 20, .95),
                                       (42, 100, .99), (250, 1000, .95), (1, 3, .5)])
def test_accuracy_interval_matches_statsmodels(k, n, level):
    lo, hi = proportion_confint(k, n, alpha=1 - level, method='wilson')
    assert accuracy_interval(k, n, level) == pytest.approx((lo, hi), abs=1e-12)

def test_accuracy_interval_by_hand():
    # Wilson: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), here for 3 of 4 at 95%
    z, p, n = norm.ppf(0.975), 0.75, 4
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert accuracy_interval(3, 4) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert accuracy_interval(3, 4) == pytest.approx((0.300642, 0.954413), abs=1e-6)
    lo, hi = accuracy_interval(0, 4)
    assert lo == 0.0 and 0 < hi < 1                      # never empty at 0 correct, unlike the normal approximation

def test_accuracy_interval_errors():
    with pytest.raises(ValueError, match='needs n >= 1'): accuracy_interval(0, 0)
    with pytest.raises(ValueError, match=r'must be an integer in \[0, n = 3\]'): accuracy_interval(4, 3)
    with pytest.raises(ValueError, match='must lie in'): accuracy_interval(1, 3, level=95)

def test_task_metrics_counts_and_intervals():
    rows = ([dict(task='arc_easy', correct=c, correct_norm=not c) for c in (True, False, False, False, True)] +
            [dict(task='gsm8k', correct=False, correct_norm=False)])
    m = task_metrics(rows, 'loglik')
    assert m['n'] == {'arc_easy': 5, 'gsm8k': 1} and m['correct'] == {'arc_easy': 2, 'gsm8k': 0}
    assert m['accuracy'] == {'arc_easy': 0.4, 'gsm8k': 0.0} and m['average'] == pytest.approx(0.2)
    assert m['interval']['arc_easy'] == pytest.approx(proportion_confint(2, 5, method='wilson'))
    assert m['correct_norm'] == {'arc_easy': 3, 'gsm8k': 0} and m['average_norm'] == pytest.approx(0.3)
    assert 'accuracy_norm' not in task_metrics(rows, 'generate')
    json.dumps(m)

def test_protocol_is_checked():
    assert EvalConfig().protocol == 'generate'
    with pytest.raises(ConfigError, match=r"eval.protocol = 'mc' is invalid: allowed one of 'generate', 'loglik'"):
        EvalConfig(protocol='mc')

def hand_loglik(model, tok, context:str, continuation:str) -> float:
    "log p(continuation | context) split as lm-eval's HFLM splits it, scored with cream_nb.stages.rewards' log-prob kernel."
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    assert whole[:len(ctx)] == ctx
    with torch.inference_mode(): lp, n = _batch_logps(model, tok, [whole], [len(ctx)], keep=False)
    assert int(n[0]) == len(whole) - len(ctx)
    return float(lp[0])

def check_against_hand(model, tok, records, rows):
    "Every row's option log-likelihoods, acc pick and acc_norm pick equal a hand computation."
    from cream_nb.data.records import parse_prompt
    by_id = {r['id']: r for r in records}
    assert sorted(r['id'] for r in rows) == sorted(by_id)
    for row in rows:
        q, ch = parse_prompt(by_id[row['id']]['messages'][-1]['content'])
        ll = [hand_loglik(model, tok, f"Question: {q}\nAnswer:", ' ' + text) for text in ch.values()]
        assert row['loglik'] == pytest.approx(ll, abs=2e-3), row['id']
        labels = list(ch)
        assert row['extracted'] == labels[int(np.argmax(ll))]
        assert row['extracted_norm'] == labels[int(np.argmax(np.array(ll) / [len(t) for t in ch.values()]))]
        assert row['correct'] == (row['extracted'] == by_id[row['id']]['answer'])
        assert row['correct_norm'] == (row['extracted_norm'] == by_id[row['id']]['answer'])

@pytest.fixture(scope='module')
def tiny():
    return load_model('tiny')

@pytest.mark.parametrize('scorer', ['shared', 'lm-eval'])
def test_loglik_tiny_matches_hand_computation(tiny, scorer):
    model, tok = tiny
    records = [dict(r) for t in MC for r in load_test_set(t, source='offline', limit=2)]
    rows = loglik_predictions(model, tok, records, EvalConfig(batch_size=4, loglik_scorer=scorer), progress=False)
    check_against_hand(model, tok, records, rows)

@pytest.mark.parametrize('bs', [1, 6])
def test_shared_loglik_equals_lm_eval(tiny, bs):
    "Each question prefilled once = lm-eval's HFLM: option log-likelihoods to 1e-4, the same acc and acc_norm picks, same row order."
    model, tok = tiny
    records = [dict(r) for t in MC for r in load_test_set(t, source='offline', limit=5)]
    ref = loglik_predictions(model, tok, records, EvalConfig(batch_size=bs, loglik_scorer='lm-eval'), progress=False)
    own = loglik_predictions(model, tok, records, EvalConfig(batch_size=bs), progress=False)
    assert [(r['task'], r['id']) for r in own] == [(r['task'], r['id']) for r in ref] and len(own) == 5 * len(MC)
    assert {len(r['loglik']) for r in own} >= {3, 4}                        # SIQA's 3 options and the others' 4
    for o, r in zip(own, ref):
        assert np.abs(np.array(o['loglik']) - r['loglik']).max() < 1e-4, o['id']
        assert {k: o[k] for k in o if k != 'loglik'} == {k: r[k] for k in r if k != 'loglik'}
    assert any(r['extracted'] != r['extracted_norm'] for r in own)           # acc_norm's per-character division matters here

def test_loglik_scorer_is_checked():
    from cream_nb.stages.evaluate import loglik_predictions as lp
    with pytest.raises(ConfigError, match=r"eval.loglik_scorer = 'vllm' is invalid: allowed one of 'shared', 'lm-eval'"):
        EvalConfig(loglik_scorer='vllm')
    class Cfg: batch_size, loglik_scorer = 4, 'fast'
    with pytest.raises(ValueError, match="eval.loglik_scorer must be 'shared' or 'lm-eval', got 'fast'"): lp(None, None, [], Cfg())

def check_run(res, out, protocol, limit):
    "metrics.json and predictions.jsonl of one evaluation agree with each other and with the intervals."
    m, rows = json.loads((out/'metrics.json').read_text()), read_jsonl(out/'predictions.jsonl')
    assert m['protocol'] == protocol and {k: m[k] for k in res if k != 'seconds'} == {k: res[k] for k in res if k != 'seconds'}
    assert m['n'] == {t: limit for t in EvalConfig().tasks}
    for t in m['n']:
        k = sum(r['correct'] for r in rows if r['task'] == t)
        assert m['correct'][t] == k and m['accuracy'][t] == k / limit
        assert m['interval'][t] == pytest.approx(proportion_confint(k, limit, method='wilson'))
    assert m['average'] == pytest.approx(np.mean(list(m['accuracy'].values())))
    labels = {r['id']: [c['label'] for c in r['choices']] or None for t in m['n'] for r in load_test_set(t, source='offline', limit=limit)}
    for r in rows:
        if 'response' in r:        # generated: the stored extraction is what the extractor gives
            assert r['extracted'] == extract_answer(r['response'], r['task'], labels[r['id']])
            assert r['correct'] == answers_match(r['extracted'], r['gold'], r['task'])
    return m, rows

def test_both_protocols_tiny(tiny, tmp_path):
    model, tok = tiny
    gen = evaluate(model, tok, EvalConfig(limit=2, max_new_tokens=8), out_dir=tmp_path/'gen', source='offline', progress=False)
    ll = evaluate(model, tok, EvalConfig(limit=2, max_new_tokens=8, protocol='loglik'), out_dir=tmp_path/'ll', source='offline', progress=False)
    check_run(gen, tmp_path/'gen', 'generate', 2)
    m, rows = check_run(ll, tmp_path/'ll', 'loglik', 2)
    assert ll['accuracy']['gsm8k'] == gen['accuracy']['gsm8k']          # GSM8K is generative under both
    assert {r['task'] for r in rows if 'loglik' in r} == set(MC) and all('response' in r for r in rows if r['task'] == 'gsm8k')
    assert set(m['accuracy_norm']) == set(m['accuracy']) and m['interval_norm']

@pytest.mark.slow
def test_both_protocols_embedded(tmp_path):
    "The embedded SmolLM2-135M-Instruct by both protocols; its loglik scores equal a hand computation."
    model, tok = load_model('embedded')
    ll = evaluate(model, tok, EvalConfig(limit=2, max_new_tokens=16, protocol='loglik'), out_dir=tmp_path/'ll', source='offline', progress=False)
    m, rows = check_run(ll, tmp_path/'ll', 'loglik', 2)
    records = [dict(r) for t in MC for r in load_test_set(t, source='offline', limit=2)]
    check_against_hand(model, tok, records, [r for r in rows if 'loglik' in r])
    gen = evaluate(model, tok, EvalConfig(limit=2, max_new_tokens=16, tasks=['arc_easy', 'gsm8k']), out_dir=tmp_path/'gen', source='offline', progress=False)
    assert gen['n'] == {'arc_easy': 2, 'gsm8k': 2} and gen['protocol'] == 'generate'
    assert all(r['response'] for r in read_jsonl(tmp_path/'gen'/'predictions.jsonl'))   # the model really wrote answers

SUMMARY = {'m1_eval': {'accuracy': {'arc_easy': 0.75, 'gsm8k': 0.0}, 'average': 0.375, 'n': {'arc_easy': 4, 'gsm8k': 4},
                       'correct': {'arc_easy': 3, 'gsm8k': 0}, 'interval': {'arc_easy': list(accuracy_interval(3, 4)), 'gsm8k': list(accuracy_interval(0, 4))},
                       'protocol': 'loglik'},
           'iterations': [{'iteration': 1, 'model': 'm2', 'eval': {'accuracy': {'arc_easy': 0.5, 'gsm8k': 0.25}, 'average': 0.375,
                                                                   'n': {'arc_easy': 4, 'gsm8k': 4}}}]}   # a run from before intervals were stored

def test_summary_table_shows_n_and_intervals():
    from cream_nb.reporting.tables import summary_table
    out = summary_table(SUMMARY)
    lo, hi = proportion_confint(3, 4, method='wilson')
    assert 'arc_easy (n=4)' in out and f"0.750 [{lo:.2f},{hi:.2f}]" in out
    lo, hi = proportion_confint(2, 4, method='wilson')                       # computed from accuracy and n for the old run
    assert f"0.500 [{lo:.2f},{hi:.2f}]" in out
    assert out.splitlines()[-1] == 'accuracy [95% Wilson interval]; eval protocol: generate, loglik'
    odd = {'m1_eval': dict(SUMMARY['m1_eval'], n={'arc_easy': 5, 'gsm8k': 4}), 'iterations': SUMMARY['iterations']}
    assert 'arc_easy (n=' not in summary_table(odd) and '/5' in summary_table(odd)   # different n per model: in the cell

def test_accuracy_figure_error_bars():
    from cream_nb.reporting.figures import accuracy_figure
    fig = accuracy_figure(SUMMARY)
    tr = {t.name: t for t in fig.data}
    lo, hi = proportion_confint(3, 4, method='wilson')
    assert list(tr['arc_easy'].y) == [0.75, 0.5]
    assert tr['arc_easy'].error_y.array[0] == pytest.approx(hi - 0.75) and tr['arc_easy'].error_y.arrayminus[0] == pytest.approx(0.75 - lo)
    lo, hi = proportion_confint(2, 4, method='wilson')
    assert tr['arc_easy'].error_y.array[1] == pytest.approx(hi - 0.5)
    assert tr['average'].error_y.array is None                               # the macro average has no interval

def test_eval_precision(tiny, monkeypatch):
    "eval.precision: 'auto' is fp32 here (the bench's decision), bf16 runs both scorers alike, no bf16 matmuls stops before any work."
    from cream_nb.models import precision as R
    model, tok = tiny
    records = [dict(r) for t in MC for r in load_test_set(t, source='offline', limit=1)]
    fp32 = loglik_predictions(model, tok, records, EvalConfig(batch_size=4, precision='fp32'), progress=False)
    assert R.BF16_AUTO['eval.precision'] is False
    assert loglik_predictions(model, tok, records, EvalConfig(batch_size=4), progress=False) == fp32
    monkeypatch.setattr(R, 'bf16_matmuls', lambda device='cpu': True)             # bf16 autocast runs (emulated) on any CPU
    own = loglik_predictions(model, tok, records, EvalConfig(batch_size=4, precision='bf16'), progress=False)
    ref = loglik_predictions(model, tok, records, EvalConfig(batch_size=4, precision='bf16', loglik_scorer='lm-eval'), progress=False)
    d = [abs(a - b) for o, r in zip(own, ref) for a, b in zip(o['loglik'], r['loglik'])]
    d32 = [abs(a - b) for o, r in zip(own, fp32) for a, b in zip(o['loglik'], r['loglik'])]
    assert max(d) < 0.05 and 0 < max(d32) < 0.5
    monkeypatch.setattr(R, 'bf16_matmuls', lambda device='cpu': False)
    called = []
    monkeypatch.setattr('cream_nb.stages.evaluate.generate_predictions', lambda *a, **k: called.append(1) or [])
    with pytest.raises(RuntimeError, match="eval.precision='bf16' needs bf16 matmul instructions"):
        evaluate(model, tok, EvalConfig(limit=1, protocol='loglik', precision='bf16'), source='offline', progress=False)
    assert not called                                                               # stopped before generating GSM8K answers
