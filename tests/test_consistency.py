"""cream_nb.stages.consistency against scipy.stats, the top-order definition, constant vectors, bad shapes, id alignment."""
import numpy as np, pytest, torch
from hypothesis import given, settings, strategies as st
from scipy.stats import kendalltau, spearmanr
from cream_nb.stages.consistency import consistency_rate, consistency_rate_rows, consistency_rates, consistency_report, consistency_summary, set_consistency
from cream_nb.core.stats import kendall_tau_b, spearman_rho, top_order_agreement

SCIPY = {'kendall': lambda a, b: kendalltau(a, b).statistic, 'spearman': lambda a, b: spearmanr(a, b).statistic}


@pytest.mark.parametrize('method', ['kendall', 'spearman'])
@pytest.mark.parametrize('n', range(2, 9))
def test_rates_equal_scipy_on_tie_free_vectors(method, n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(120, n)), rng.normal(size=(120, n))
    assert all(len(set(r)) == n for r in np.vstack([a, b]))                # tie-free
    want = np.array([(SCIPY[method](x, y) + 1) / 2 for x, y in zip(a, b)])
    np.testing.assert_allclose(consistency_rate_rows(a, b, method), want, rtol=0, atol=1e-12)
    for x, y, w in zip(a[:20], b[:20], want):                              # the one-vector entry point too
        assert abs(consistency_rate(x, y, method) - w) <= 1e-12


@pytest.mark.parametrize('n', range(2, 9))
def test_rates_on_permutations_hit_exact_values(n):
    "Ranks given as permutations: kendall = (concordant - discordant) / n0 counted by hand, spearman by its closed form."
    rng = np.random.default_rng(100 + n)
    for _ in range(100):
        a, b = rng.permutation(n).astype(float), rng.permutation(n).astype(float)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
        assert abs(consistency_rate(a, b) - (s / len(pairs) + 1) / 2) <= 1e-12
        rho = 1 - 6 * ((a - b) ** 2).sum() / (n * (n * n - 1))
        assert abs(consistency_rate(a, b, 'spearman') - (rho + 1) / 2) <= 1e-12
    assert consistency_rate(np.arange(n), np.arange(n)) == 1.0                     # exact ends, not 1 - 1e-16
    assert consistency_rate(np.arange(n), -np.arange(n)) == 0.0


@pytest.mark.filterwarnings('ignore::scipy.stats.ConstantInputWarning')
@settings(max_examples=300, deadline=None)
@given(st.integers(2, 8).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 3), min_size=n, max_size=n),
                                                     st.lists(st.integers(0, 3), min_size=n, max_size=n))))
def test_ties_follow_scipy_tau_b_and_average_ranks(ab):
    a, b = map(np.array, ab)
    for method in ('kendall', 'spearman'):
        if len(set(a)) == 1 or len(set(b)) == 1:                          # scipy: NaN; ours: 0.5
            assert np.isnan(SCIPY[method](a, b)) and consistency_rate(a, b, method) == 0.5
        else:
            assert abs(consistency_rate(a, b, method) - (SCIPY[method](a, b) + 1) / 2) <= 1e-12


def _top_order_by_definition(a, b):
    "1 if the set of argmaxes and the set of argmins agree, else 0 (no vectorisation, for reference)."
    best = lambda x: {i for i, v in enumerate(x) if v == max(x)}
    worst = lambda x: {i for i, v in enumerate(x) if v == min(x)}
    return float(best(a) == best(b) and worst(a) == worst(b))


def test_toporder_definition():
    assert consistency_rate([0.9, 0.1, 0.5, 0.3], [2.0, -1.0, 0.0, 1.0], 'toporder') == 1.0   # middle order differs
    assert consistency_rate([0.9, 0.1, 0.5, 0.3], [2.0, 0.0, -1.0, 1.0], 'toporder') == 0.0   # worst differs
    assert consistency_rate([0.9, 0.1, 0.5, 0.3], [0.0, -1.0, 2.0, 1.0], 'toporder') == 0.0   # best differs
    # the paper's code compares response 0 and N-1; here best is index 2 and worst index 0 in both:
    assert consistency_rate([1, 2, 3], [0, 5, 9], 'toporder') == 1.0
    assert consistency_rate([0, 3, 1], [0, 3, 2], 'toporder') == 1.0     # responses 0 and N-1 not the best/worst pair
    assert consistency_rate([3, 3, 1], [5, 5, 0], 'toporder') == 1.0     # same tied maxima
    assert consistency_rate([3, 3, 1], [5, 4, 0], 'toporder') == 0.0     # {0, 1} is not {0}
    rng = np.random.default_rng(7)
    for n in range(2, 9):
        a, b = rng.integers(0, 4, size=(200, n)).astype(float), rng.integers(0, 4, size=(200, n)).astype(float)
        got = top_order_agreement(a, b)
        for x, y, g in zip(a, b, got):
            if len(set(x)) == 1 or len(set(y)) == 1: assert np.isnan(g)
            else: assert g == _top_order_by_definition(list(x), list(y))


@pytest.mark.parametrize('method', ['kendall', 'spearman', 'toporder'])
def test_constant_vector_gives_half_never_nan(method):
    for a, b in [([2.0] * 5, [1, 2, 3, 4, 5]), ([1, 2, 3], [0, 0, 0]), ([7, 7], [7, 7]), ([-1e9] * 4, [-1e9] * 4)]:
        assert consistency_rate(a, b, method) == 0.5
    rates = consistency_rates({'x': [1., 1., 1.], 'y': [1., 2., 3.]}, {'x': [3., 1., 2.], 'y': [1., 2., 3.]}, method)
    assert rates == {'x': 0.5, 'y': 1.0}


def test_bad_shapes_and_values():
    with pytest.raises(ValueError, match='N >= 2'): consistency_rate([1.0], [1.0])
    with pytest.raises(ValueError, match='N >= 2'): consistency_rate([], [])
    with pytest.raises(ValueError, match='same length, got 3 and 4'): consistency_rate([1, 2, 3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match=r'non-finite reward at \(0, 1\)'): consistency_rate([1, float('nan'), 3], [1, 2, 3])
    with pytest.raises(ValueError, match='missing \\(None\\)'): consistency_rate([1, 2, 3], [1, None, 3])
    with pytest.raises(ValueError, match='must hold numbers'): consistency_rate(['a', 'b'], [1, 2])
    with pytest.raises(ValueError, match='unknown consistency method'): consistency_rate([1, 2], [2, 1], method='tau')
    with pytest.raises(ValueError, match='shape'): kendall_tau_b(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="prompt 'b': 3 current rewards but 2 previous"):
        consistency_rates({'a': [1, 2], 'b': [1, 2, 3]}, {'a': [1, 2], 'b': [1, 2]})
    with pytest.raises(ValueError, match="prompt 'a': previous rewards"):
        consistency_rates({'a': [1, 2]}, {'a': [1, None]})
    with pytest.raises(ValueError, match="prompt 'a': current rewards"):
        consistency_rates({'a': [1]}, {'a': [1]})


def test_torch_and_batched_inputs_agree():
    a, b = torch.tensor([0.3, -1.2, 2.0, 0.1]), torch.tensor([0.1, -0.2, 1.0, 0.4])
    assert consistency_rate(a, b) == consistency_rate(a.tolist(), b.tolist())
    A, B = np.random.default_rng(1).normal(size=(2, 30, 5))
    for m in ('kendall', 'spearman', 'toporder'):
        np.testing.assert_array_equal(consistency_rate_rows(A, B, m), [consistency_rate(x, y, m) for x, y in zip(A, B)])
    np.testing.assert_allclose(spearman_rho(A, B), [spearmanr(x, y).statistic for x, y in zip(A, B)], atol=1e-12)


def test_rates_keyed_by_prompt_id_survive_a_skipped_prompt():
    rng = np.random.default_rng(3)
    ids = [f'arc_easy-{i:012x}' for i in range(40)]
    cur = {p: rng.normal(size=int(rng.integers(2, 7))).tolist() for p in ids}       # N varies by prompt
    prev = {p: rng.normal(size=len(cur[p])).tolist() for p in ids}
    for method in ('kendall', 'spearman', 'toporder'):
        full = consistency_rates(cur, prev, method)
        assert list(full) == ids
        for p in ids: assert full[p] == consistency_rate(cur[p], prev[p], method)
        skip = ids[5]
        part = consistency_rates({p: v for p, v in cur.items() if p != skip}, {p: v for p, v in prev.items() if p != skip}, method)
        assert part == {p: r for p, r in full.items() if p != skip}
    # the order of `previous` does not matter: matching is by id, not position
    assert consistency_rates(cur, dict(reversed(list(prev.items())))) == consistency_rates(cur, prev)
    with pytest.raises(ValueError, match=r"only in current 1 \(e.g. \['arc_easy-000000000005'\]\), only in previous 0"):
        consistency_rates(cur, {p: v for p, v in prev.items() if p != ids[5]})


def test_set_rate_and_summary():
    rates = {'a': 0.0, 'b': 0.1, 'c': 0.3, 'd': 0.55, 'e': 0.999, 'f': 1.0}
    assert set_consistency(rates) == pytest.approx(np.mean(list(rates.values())), abs=1e-15)
    s = consistency_summary(rates)
    assert s['n'] == 6 and s['min'] == 0.0 and s['max'] == 1.0
    assert s['std'] == pytest.approx(np.std(list(rates.values())), abs=1e-15)
    assert s['histogram']['counts'] == [1, 1, 0, 1, 0, 1, 0, 0, 0, 2]
    assert len(s['histogram']['edges']) == 11 and s['histogram']['edges'][3] == 0.3
    # Kendall rates for N = 5 are k/10 up to float error; each lands in its own bin k
    k = consistency_rate_rows(np.tile(np.arange(5.), (11, 1)),
                              np.array([[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [1, 0, 3, 2, 4], [1, 0, 3, 4, 2], [1, 3, 0, 4, 2],
                                        [3, 1, 0, 4, 2], [3, 1, 4, 0, 2], [3, 4, 1, 0, 2], [4, 3, 1, 0, 2], [4, 3, 1, 2, 0],
                                        [4, 3, 2, 1, 0]], float))
    np.testing.assert_allclose(k, np.arange(10, -1, -1) / 10, atol=1e-12)
    assert consistency_summary(dict(enumerate(k)))['histogram']['counts'] == [1] * 9 + [2]
    with pytest.raises(ValueError, match='at least one'): set_consistency({})
    with pytest.raises(ValueError, match=r"prompt 'z' has -0.1"): consistency_summary({'y': 0.2, 'z': -0.1})
    assert consistency_summary({})['histogram']['counts'] == [0] * 10


def test_report_is_json_ready():
    import json
    rep = consistency_report({'a': [1, 2, 3], 'b': [2, 2, 2]}, {'a': [1, 3, 2], 'b': [1, 2, 3]})
    assert rep['method'] == 'kendall' and rep['per_prompt'] == {'a': pytest.approx(2 / 3), 'b': 0.5}
    assert rep['set'] == pytest.approx((2 / 3 + 0.5) / 2)
    assert json.loads(json.dumps(rep, allow_nan=False))['summary']['n'] == 2


# ---- consistency.paper_code: a copy of Raibows/CREAM's computation, in our words, mirroring its arithmetic ----
from scipy.stats import rankdata

def paper_cal_consistency(file1:dict, file2:dict, method:str) -> dict:
    "cal_consistency.py: ordinal ranks of each reward list, then scipy's kendalltau / spearmanr, scaled to [0, 1]."
    out = {}
    for key in set(file1) & set(file2):
        s1, s2 = file1[key], file2[key]
        if len(s1) != len(s2) or None in s1 or None in s2: continue
        r1, r2 = rankdata(s1, method='ordinal'), rankdata(s2, method='ordinal')
        if method == 'kendall': out[key] = (kendalltau(r1, r2)[0] + 1) / 2
        elif method == 'spearman': out[key] = (spearmanr(r1, r2)[0] + 1) / 2
    return out

def paper_avg_consistency(file1:dict, rates:dict) -> float:
    "cal_consistency.py keeps prompts whose argmax != argmin reward; data.py averages their (non-None) consistency."
    kept = [rates.get(k) for k, r in file1.items() if np.argmax(r) != np.argmin(r)]
    kept = [c for c in kept if c is not None]
    return sum(kept) / len(kept)

HAND = {   # hand-made rewards with the ties the two treatments disagree on
    'tie_both':   ([0.5, 0.5, 0.1, 0.9], [0.2, 0.2, 0.1, 0.3]),
    'tie_one':    ([1.0, 2.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]),
    'constant':   ([0.7, 0.7, 0.7, 0.7], [0.1, 0.4, 0.2, 0.3]),
    'untied':     ([0.3, 0.1, 0.4, 0.2], [0.1, 0.2, 0.3, 0.4]),
    'identical':  ([-1.0, -1.0, -2.0, -3.0], [-5.0, -5.0, -4.0, -6.0]),
}
CUR, PREV = {k: v[0] for k, v in HAND.items()}, {k: v[1] for k, v in HAND.items()}

@pytest.mark.parametrize('method', ['kendall', 'spearman'])
def test_paper_code_rates_equal_the_papers_computation(method):
    ours = consistency_rates(CUR, PREV, method, paper_code=True)
    want = paper_cal_consistency(CUR, PREV, method)
    assert ours.keys() == want.keys()
    for k in ours: assert ours[k] == pytest.approx(want[k], abs=1e-12), k
    # and they differ from the project's own tie handling where ties occur
    default = consistency_rates(CUR, PREV, method)
    assert default['untied'] == pytest.approx(ours['untied'], abs=1e-12)
    assert default['constant'] == 0.5 and ours['constant'] != 0.5
    assert default['tie_one'] != pytest.approx(ours['tie_one'])

def test_paper_code_rates_on_random_tied_rewards():
    rng = np.random.default_rng(7)
    cur = {f'p{i}': rng.integers(0, 3, 5).astype(float).tolist() for i in range(60)}   # 3 values for 5 responses: ties
    prev = {k: rng.integers(0, 3, 5).astype(float).tolist() for k in cur}
    want, ours = paper_cal_consistency(cur, prev, 'kendall'), consistency_rates(cur, prev, 'kendall', paper_code=True)
    assert all(ours[k] == pytest.approx(want[k], abs=1e-12) for k in cur)

def test_paper_avg_over_prompts_with_a_pair():
    rates = consistency_rates(CUR, PREV, paper_code=True)
    ours = set_consistency(rates, among=[k for k, r in CUR.items() if np.argmax(r) != np.argmin(r)])
    assert ours == pytest.approx(paper_avg_consistency(CUR, rates), abs=1e-12)
    assert ours != pytest.approx(set_consistency(rates))            # 'constant' made no pair: the two means differ
    rep = consistency_report(CUR, PREV, paper_code=True)
    assert rep['paper_code'] is True and 'paper_code' not in consistency_report(CUR, PREV)

def paper_m0_label_counts(tokenizer, messages:list, responses:list) -> list:
    "rewarding.py's PaddingCollator + calculate_rewards: left-padded batch, prefix masked, count of labels != pad."
    prefix = [len(tokenizer.apply_chat_template(messages, tokenize=True)['input_ids'])] * len(responses)
    convs = [messages + [{'role': 'assistant', 'content': r}] for r in responses]
    inputs = tokenizer.apply_chat_template(convs, padding=True, return_tensors='pt', return_dict=True)
    labels = inputs['input_ids'].clone()
    for i in range(len(labels)):
        for j in range(len(labels[i])):
            if labels[i, j] != tokenizer.pad_token_id:
                labels[i, j:j + prefix[i]] = tokenizer.pad_token_id
                break
    return (labels[:, 1:] != tokenizer.pad_token_id).sum(-1).tolist()

def test_paper_m0_counts_equal_the_papers_collator():
    from cream_nb.models.loading import load_tokenizer, embedded_tokenizer_dir
    from cream_nb.stages.rewards import paper_label_counts
    from cream_nb.models.logprobs import build_sequence
    tok = load_tokenizer(embedded_tokenizer_dir())
    tok.padding_side = 'left'
    msgs = [{'role': 'user', 'content': 'Which is heavier, a kilo of iron or a kilo of feathers?'}]
    resps = ['Neither.', 'They weigh the same: one kilogram each.', ' Iron, obviously!\n\nJust kidding: both weigh 1 kg.']
    want = paper_m0_label_counts(tok, msgs, resps)
    assert paper_label_counts(tok, msgs, resps) == want
    ours = [len(build_sequence(tok, msgs, r)[0]) - build_sequence(tok, msgs, r)[1] for r in resps]
    assert [w - o for w, o in zip(want, ours)] == [4, 4, 4]      # the assistant header, as the issue found

@pytest.mark.slow
def test_paper_code_through_the_loop(tmp_path):
    "A tiny run with consistency.paper_code: M0's reward over the paper's label count, ordinal ranks, C over paired prompts."
    from cream_nb.core.config import apply_overrides, preset
    from cream_nb.core.artifacts import read_json, read_jsonl
    from cream_nb.runs.run import CreamRun
    from cream_nb.stages.rewards import paper_label_counts
    run = CreamRun(apply_overrides(preset('tiny'), ['consistency.paper_code=true']), tmp_path/'run', progress=False)
    run.sft(); it = run.iteration(1)
    it.sample(); it.score(); cons = it.consistency(); pairs = it.pairs()
    prompts = {p['id']: p for p in read_jsonl(it.dir/'prompts.jsonl')}
    samples = {s['prompt_id']: s for s in read_jsonl(it.dir/'samples.jsonl')}
    m0 = {r['prompt_id']: r for r in read_jsonl(it.dir/'logps_m0.jsonl')}            # stored with our own counts
    rewards = {r['prompt_id']: r for r in read_jsonl(it.dir/'rewards.jsonl')}
    tok = run.tokenizer
    with run.model('m0') as model:
        for pid, r in rewards.items():
            counts = paper_label_counts(tok, prompts[pid]['messages'], samples[pid]['responses'])
            assert counts == [n + 4 for n in m0[pid]['n_tokens']]
            want = []
            for resp in samples[pid]['responses']:   # rewarding.py's arithmetic on a batch of one: labels after the prefix, no pad
                msgs = prompts[pid]['messages']
                x = torch.tensor([list(tok.apply_chat_template(msgs + [{'role': 'assistant', 'content': resp}], tokenize=True)['input_ids'])])
                lab = x.clone(); lab[0, :len(tok.apply_chat_template(msgs, tokenize=True)['input_ids'])] = tok.pad_token_id
                with torch.no_grad(): lp = model(x).logits[0, :-1].double().log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
                keep = lab[0, 1:] != tok.pad_token_id
                want.append(lp[keep].sum().item() / int(keep.sum()))
            assert r['previous'] == pytest.approx(want, abs=1e-5)
            assert r['previous'] != pytest.approx([lp / n for lp, n in zip(m0[pid]['logps'], counts)], abs=1e-9)   # not our sum
    want = paper_cal_consistency({p: r['current'] for p, r in rewards.items()}, {p: r['previous'] for p, r in rewards.items()}, 'kendall')
    assert cons['paper_code'] is True and all(cons['per_prompt'][p] == pytest.approx(want[p], abs=1e-12) for p in want)
    C = paper_avg_consistency({p: r['current'] for p, r in rewards.items()}, cons['per_prompt'])
    assert len(pairs) and all(c == pytest.approx(C, abs=1e-12) for c in pairs['set_consistency'])
    assert read_json(it.dir/'pairs_stats.json')['set_consistency'] == pytest.approx(C, abs=1e-12)
