"""`cream compare`: shared stages run once (counted in the stage logs), every method directory is a normal
resumable run, methods can be added later, and the tables hold the right numbers for hand-made run directories
(intervals and McNemar against statsmodels, consistency against scipy, movement by hand)."""
import json, math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import kendalltau, spearmanr
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from cream_nb.reporting import tables as C
from cream_nb.core.config import preset, save_config
from cream_nb.core.artifacts import write_json, write_jsonl, save_dataset, read_json
from cream_nb.runs.run import CreamRun
from cream_nb.runs.stage import StageLog
from cream_nb.core.config import load_config
from cream_nb.reporting import prompts as prompts_
from cream_nb.reporting import figures as figures_
from cream_nb.runs import compare as compare_
from cream_nb.reporting import widgets as widgets_

# ---------------------------------------------------------------- hand-made comparison directories

def _preds(d:Path, rows):
    write_jsonl([dict(task=t, id=i, correct=c) for t, i, c in rows], d/'predictions.jsonl')

def _answers(rng, n, p): return (rng.random(n) < p).tolist()

@pytest.fixture(scope='module')
def hand(tmp_path_factory):
    "Three methods on 12 questions per task (arc_easy, gsm8k), one iteration, answers drawn at random."
    root = tmp_path_factory.mktemp('cmp'); rng = np.random.default_rng(3)
    qs = [(t, f'{t}-{k}') for t in ('arc_easy', 'gsm8k') for k in range(12)]
    truth = {'m1': _answers(rng, 24, .4), 'dpo': _answers(rng, 24, .5), 'cream-avg': _answers(rng, 24, .7)}
    cfg = preset('tiny')
    cur, prev = rng.normal(size=(5, 4)).round(2), rng.normal(size=(5, 4)).round(2)   # both methods' rewards, 5 prompts x 4 responses
    for m in ('m1', 'dpo', 'cream-avg'):
        d = root/m; save_config(cfg, d/'config.json')
        (d/'eval_m1').mkdir(parents=True); _preds(d/'eval_m1', [(t, i, c) for (t, i), c in zip(qs, truth['m1'])])
        if m == 'm1': continue
        it = d/'iter1'; (it/'eval').mkdir(parents=True)
        _preds(it/'eval', [(t, i, c) for (t, i), c in zip(qs, truth[m])])
        if m == 'cream-avg':
            write_jsonl([dict(prompt_id=f'p{k}', current=cur[k].tolist(), previous=prev[k].tolist()) for k in range(5)], it/'rewards.jsonl')
        else:   # a judge-like method: rewards.jsonl holds no previous ranking; the table's own implicit rewards are in compare/
            write_jsonl([dict(prompt_id=f'p{k}', current=[1, 2, 3, 4], previous=None) for k in range(5)], it/'rewards.jsonl')
            (it/'compare').mkdir(); write_jsonl([dict(prompt_id=f'p{k}', current=cur[k].tolist(), previous=prev[k].tolist()) for k in range(5)], it/'compare'/'rewards.jsonl')
        write_json({'current': {'accuracy': 0.6 if m == 'dpo' else 0.75, 'pairs': 8}}, it/'reward_accuracy.json')
        import datasets
        ref_c, ref_r = [-10., -12., -9.], [-11., -10., -13.]
        save_dataset(datasets.Dataset.from_dict(dict(prompt_id=['p0', 'p1', 'p2'], ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)), it/'pairs')
        (it/'compare').mkdir(exist_ok=True)
        write_json({'model': 'm2', 'chosen': [-9., -11.5, -9.], 'rejected': [-12., -10., -14.]}, it/'compare'/'pair_logps.json')
    return root, qs, truth, {'cur': cur, 'prev': prev}

def test_accuracy_cells_and_intervals(hand):
    root, qs, truth, _ = hand
    tab = C.compare_tables(root)
    assert tab['methods'] == ['m1', 'dpo', 'cream-avg'] and tab['reference'] == 'cream-avg'
    for m in ('dpo', 'cream-avg'):
        cells = tab['accuracy'][m]['m2']
        for t in ('arc_easy', 'gsm8k'):
            v = [c for (tt, _), c in zip(qs, truth[m]) if tt == t]
            assert (cells[t]['correct'], cells[t]['n']) == (sum(v), 12)
            assert cells[t]['accuracy'] == pytest.approx(sum(v) / 12)
            assert (cells[t]['low'], cells[t]['high']) == pytest.approx(proportion_confint(sum(v), 12, method='wilson'), abs=1e-12)
        k = sum(truth[m])
        assert cells['average']['accuracy'] == pytest.approx((cells['arc_easy']['accuracy'] + cells['gsm8k']['accuracy']) / 2)
        assert (cells['average']['low'], cells['average']['high']) == pytest.approx(proportion_confint(k, 24, method='wilson'), abs=1e-12)
    assert list(tab['accuracy']['m1']) == ['m1'] and list(tab['accuracy']['dpo']) == ['m1', 'm2']

def test_mcnemar_against_statsmodels(hand):
    root, qs, truth, _ = hand
    tab = C.compare_tables(root)
    a, b, m1 = (np.array(truth[k]) for k in ('dpo', 'cream-avg', 'm1'))
    for x, y, got in [(a, b, tab['paired_tests']['dpo']['vs_reference']), (a, m1, tab['paired_tests']['dpo']['vs_m1']),
                      (b, m1, tab['paired_tests']['cream-avg']['vs_m1'])]:
        table = [[int((x & y).sum()), int((x & ~y).sum())], [int((~x & y).sum()), int((~x & ~y).sum())]]
        assert (got['a_only'], got['b_only'], got['n']) == (table[0][1], table[1][0], 24)
        assert got['p_value'] == pytest.approx(mcnemar(table, exact=True).pvalue, abs=1e-12)
    assert tab['paired_tests']['cream-avg']['vs_reference'] is None and tab['paired_tests']['m1']['vs_m1'] is None

def test_consistency_reward_accuracy_movement(hand):
    root, _, _, r = hand
    tab = json.loads(json.dumps(C.compare_tables(root)))
    kt = [(kendalltau(r['cur'][k], r['prev'][k]).statistic + 1) / 2 for k in range(5)]
    sp = [(spearmanr(r['cur'][k], r['prev'][k]).statistic + 1) / 2 for k in range(5)]
    for m in ('dpo', 'cream-avg'):   # the judge-like method's table comes from compare/rewards.jsonl
        c = tab['consistency'][m]['1']
        assert c['kendall']['mean'] == pytest.approx(np.mean(kt)) and c['kendall']['std'] == pytest.approx(np.std(kt))
        assert c['spearman']['mean'] == pytest.approx(np.mean(sp))
    assert tab['reward_accuracy']['dpo']['1']['accuracy'] == 0.6
    mv = tab['movement']['dpo']['1']
    dc, dr = np.array([1., .5, 0.]), np.array([-1., 0., -1.])   # log pi_2 - log pi_1 on chosen / rejected, by hand
    assert mv['mean_abs_logp_change'] == pytest.approx(np.abs(np.r_[dc, dr]).mean())
    assert mv['margin_after'] == pytest.approx(0.1 * (dc - dr).mean())   # tiny's beta is the paper's 0.1
    text = C.compare_text(tab)
    assert 'cream-avg' in text and 'p=' in text and 'kendall' in text

def test_prompts_without_a_ranking_are_left_out_and_said(tmp_path):
    "A prompt whose rewards all tie (an unchanged model's implicit rewards are all 0) has no ranking: it is left out, and counted."
    rng = np.random.default_rng(7)
    cur, prev = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    rows = [dict(prompt_id=f'p{k}', current=cur[k].tolist(), previous=prev[k].tolist()) for k in range(3)]
    rows += [dict(prompt_id='t0', current=[0., 0., 0., 0.], previous=[1., 2., 3., 4.]), dict(prompt_id='t1', current=[1., 2., 3., 4.], previous=[.5] * 4)]
    write_jsonl(rows, tmp_path/'iter1'/'rewards.jsonl'); write_json({'pairs': 0}, tmp_path/'iter1'/'pairs_stats.json')
    write_jsonl([dict(prompt_id='t0', current=[0.] * 4, previous=[1., 2., 3., 4.])], tmp_path/'iter2'/'rewards.jsonl')
    tab = C.consistency_table(tmp_path)
    kt = [(kendalltau(cur[k], prev[k]).statistic + 1) / 2 for k in range(3)]
    assert tab[1]['kendall']['mean'] == pytest.approx(np.mean(kt)) and tab[1]['kendall']['n'] == 3
    assert (tab[1]['prompts'], tab[1]['unranked'], tab[1]['pairs']) == (5, 2, 0)
    assert tab[2]['kendall']['mean'] is None and (tab[2]['unranked'], tab[2]['pairs']) == (1, None)
    text = C.consistency_text({'consistency': {'srlm': tab}, 'reward_accuracy': {}, 'movement': {}})
    assert 'srlm iteration 1: 2 of 5 prompts left out' in text and 'unchanged' not in text.split('\n')[-2]
    assert text.splitlines()[-1].startswith('  srlm iteration 2: 1 of 1 prompts left out') and 'M_t is M_{t-1} unchanged' in text.splitlines()[-1]

def test_empty_comparison_dir_says_what_to_do(tmp_path):
    with pytest.raises(Exception, match='run `cream compare` first'): C.compare_tables(tmp_path)

def test_shared_stage_files_are_read_only(tmp_path):
    "A file the stage cache links into several runs cannot be edited in place; atomic rewrites and a forced redo still work."
    import os, stat
    from cream_nb.runs.cache import StageCache, using_cache
    from cream_nb.runs.stage import run_stage
    from cream_nb.core.artifacts import atomic_path
    cache = StageCache(tmp_path/'_shared')
    def make(run):   # a declared output in a folder, and a file beside the marker the stage does not declare
        (run/'x').mkdir(exist_ok=True); (run/'x'/'out.txt').write_text('made'); (run/'side.json').write_text('{}')
    for r in ('a', 'b', 'c'):
        (tmp_path/r).mkdir()
        with using_cache(cache): run_stage('s', tmp_path/r/'_stage_s.json', 'fp1', {}, [tmp_path/r/'x'], lambda: make(tmp_path/r), StageLog(tmp_path/r/'stages.jsonl'))
    assert [e['event'] for e in StageLog(tmp_path/'c'/'stages.jsonl').events()] == ['shared']
    for rel in ('x/out.txt', 'side.json'):
        files = [tmp_path/r/rel for r in 'abc'] + [cache.entry('s', 'fp1')/'files'/rel]
        assert all(os.path.samefile(files[0], f) for f in files[1:])
        # the tests run as root here, and root ignores file permissions: the mode bits are what can be checked then
        assert all(stat.S_IMODE(f.stat().st_mode) & 0o222 == 0 for f in files)
        if os.geteuid() != 0:
            with pytest.raises(PermissionError): open(files[1], 'a')
    assert stat.S_IMODE((tmp_path/'b'/'x').stat().st_mode) & 0o200          # folders stay writable
    a, b = tmp_path/'a'/'x'/'out.txt', tmp_path/'b'/'x'/'out.txt'
    with atomic_path(b) as tmp: tmp.write_text('rewritten')                # our writes rename a new file over the link
    assert (b.read_text(), a.read_text()) == ('rewritten', 'made')
    run_stage('s', tmp_path/'a'/'_stage_s.json', 'fp2', {'v': 2}, [tmp_path/'a'/'x'], lambda: make(tmp_path/'a'),
              StageLog(tmp_path/'a'/'stages.jsonl'), force=True)             # a forced redo drops the read-only outputs first
    assert (tmp_path/'c'/'x'/'out.txt').read_text() == 'made' and not os.path.samefile(a, tmp_path/'c'/'x'/'out.txt')

# ---------------------------------------------------------------- a real comparison on tiny

def _starts(root:Path) -> dict:
    out = {}
    for m, d in C.compare_dirs(root).items():
        for e in StageLog(d/'stages.jsonl').events():
            if e['event'] == 'start': out[e['stage']] = out.get(e['stage'], 0) + 1
    return out

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('tinycmp')/'cmp'
    tab = C.write_tables(compare_.compare('tiny', ['m1', 'dpo', 'cream-avg'], root))
    return root, tab

@pytest.mark.slow
def test_shared_stages_run_once(tiny):
    root, tab = tiny
    s = _starts(root)
    assert s['sft'] == 1 and s['eval_m1'] == 1 and s['iter1/sample'] == 1      # shared by all three / both iterating methods
    assert s['iter1/logps_m1'] == 1 and s['iter1/logps_m0'] == 1                # M1's and M0's log-probs on those samples
    assert s['iter1/train'] == 2 and s['iter2/sample'] == 2                      # each method trains and samples its own M2
    assert tab['methods'] == ['m1', 'dpo', 'cream-avg'] and set(tab['accuracy']['dpo']) == {'m1', 'm2', 'm3'}
    # shared files are the same bytes (hard links) and the shared checkpoint is registered in each run
    for m in ('dpo', 'cream-avg'):
        assert (root/m/'iter1'/'samples.jsonl').read_bytes() == (root/'m1'/'..'/'dpo'/'iter1'/'samples.jsonl').read_bytes()
        assert 'm1' in read_json(root/m/'checkpoints.json')

@pytest.mark.slow
def test_method_dirs_are_normal_resumable_runs_and_methods_add_later(tiny, capsys):
    root, _ = tiny
    before = _starts(root)
    run = CreamRun(load_config(root/'dpo'/'config.json'), root/'dpo', progress=False)
    run.run()                                   # resuming one method's run alone redoes nothing
    assert _starts(root) == before
    from cream_nb.cli import main
    assert main(['compare', '--run-dir', str(root), '--methods', 'm1', 'dpo', 'cream-avg', 'oracle', 'srlm', 'cream-dyn', '--quiet']) == 0
    out = capsys.readouterr().out
    after = _starts(root)
    assert after['sft'] == 1 and after['iter1/sample'] == 1                    # the new methods shared SFT, M1's eval, iteration 1's samples
    assert after['iter1/logps_m1'] == 1 and after['iter1/logps_m0'] == 1       # and M1's / M0's log-probs on them (SRLM's table too)
    assert after['iter1/score'] == 4           # cream-dyn's iteration-1 rewards are cream-avg's (same fingerprint); its training is its own
    assert after['iter1/train'] == 5 and after['iter1/consistency'] == 5
    for m in ('srlm', 'oracle'):   # their consistency table comes from the implicit rewards computed for it
        assert (root/m/'iter1'/'compare'/'rewards.jsonl').exists() and (root/m/'iter2'/'compare'/'rewards.jsonl').exists()
    assert 'Accuracy, %' in out and 'oracle' in out and 'report: ' in out and (root/'report.html').exists()
    assert main(['report', str(root)]) == 0 and 'Paired tests' in (root/'report.html').read_text()
    assert main(['status', str(root/'oracle')]) == 0
    tab = read_json(root/'compare.json')
    assert tab['methods'] == ['m1', 'srlm', 'dpo', 'oracle', 'cream-avg', 'cream-dyn'] and set(tab['consistency']['srlm']) == {'1', '2'}

@pytest.mark.slow
def test_pair_chooser_getters(tiny):
    root, _ = tiny
    pc = widgets_.PairChooser(root)
    rows = {r['method']: r for r in pc.rows()}    # (the test above may have added methods)
    assert {'dpo', 'cream-avg'} <= set(rows) and list(rows) == [m for m in C.compare_dirs(root) if m in rows]
    assert rows['dpo']['responses'] == rows['cream-avg']['responses']          # iteration 1: the same shared samples
    for r in rows.values():
        if r['chosen'] is not None: assert r['ranks'][r['chosen']] == 1 and r['ranks'][r['rejected']] == max(r['ranks'])
    assert rows['cream-avg']['C_train'] == 'avg' and rows['dpo']['C_train'] == 1.0
    pc.iteration.value = 2
    assert pc.prompt.value in prompts_.shared_prompts(root, 2) and '<b>dpo</b>' in pc.view.value

# ---------------------------------------------------------------- the statistics the tables state (cream_nb.core.stats in place)

def test_consistency_intervals_tests_and_mdd(hand):
    "Per-prompt values, bootstrap interval (scipy's percentile bootstrap), permutation p (scipy) and MDD (statsmodels' t-test power)."
    from scipy.stats import bootstrap, permutation_test
    from statsmodels.stats.power import TTestIndPower
    root, _, _, r = hand
    tab = json.loads(json.dumps(C.compare_tables(root)))
    c = tab['consistency']['cream-avg']['1']['kendall']
    kt = [(kendalltau(r['cur'][k], r['prev'][k]).statistic + 1) / 2 for k in range(5)]   # prompts p0..p4, in id order
    assert c['values'] == pytest.approx(kt)
    ci = bootstrap((np.array(kt),), np.mean, method='percentile', n_resamples=9999, rng=np.random.default_rng(0)).confidence_interval
    assert (c['low'], c['high']) == pytest.approx((ci.low, ci.high), abs=1e-12)
    s = tab['statistics']['consistency']['dpo']['1']
    assert s['against'] == 'cream-avg' and 'cream-avg' not in tab['statistics']['consistency']
    ref = permutation_test((kt, kt), lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis), permutation_type='independent')
    assert s['kendall']['difference'] == pytest.approx(0) and s['kendall']['p_value'] == pytest.approx(ref.pvalue) == 1.0
    sd = np.std(kt, ddof=1)
    assert s['kendall']['mdd'] == pytest.approx(sd * TTestIndPower().solve_power(nobs1=5, ratio=1, alpha=0.05, power=0.8), rel=1e-4)

def test_reward_accuracy_statistics(hand):
    from scipy.stats import binomtest, fisher_exact
    root, *_ = hand
    st = C.compare_tables(root)['statistics']['reward_accuracy']
    d, c = st['dpo']['1'], st['cream-avg']['1']
    assert (d['wins'], d['pairs'], c['wins']) == (5, 8, 6)                       # 0.6 * 8 = 4.8 -> 5; 0.75 * 8 = 6
    assert (d['low'], d['high']) == pytest.approx(proportion_confint(5, 8, method='wilson'), abs=1e-12)
    assert d['p_vs_half'] == pytest.approx(binomtest(5, 8).pvalue) and c['p_vs_half'] == pytest.approx(binomtest(6, 8).pvalue)
    assert d['p_vs_reference'] == pytest.approx(fisher_exact([[5, 3], [6, 2]]).pvalue) and c['p_vs_reference'] is None
    assert 0 < d['mdd_vs_half'] < d['mdd_vs_reference'] < 1
    text = C.reward_accuracy_text(C.compare_tables(root))
    assert 'dpo        1     5/8' in text and 'Fisher p against cream-avg' in text

def test_half_counts_round_towards_the_null():
    "A tie counts half a win; a half count is rounded towards n/2, so the test against 50% is never helped by the rounding."
    assert [C._wins(0.625, 4), C._wins(0.875, 4), C._wins(0.1, 5), C._wins(0.9, 5)] == [2, 3, 1, 4]   # 2.5, 3.5, 0.5, 4.5
    assert [C._wins(1.0, 18), C._wins(0.6, 8), C._wins(0.3, 8)] == [18, 5, 2]                          # whole or other counts: nearest

def test_mcnemar_per_task_and_mdd(hand):
    root, qs, truth, _ = hand
    tab = C.compare_tables(root)
    a, b = np.array(truth['dpo']), np.array(truth['cream-avg'])
    got = tab['paired_tests']['dpo']['vs_reference']
    for t in ('arc_easy', 'gsm8k'):
        i = np.array([q[0] == t for q in qs]); x, y = a[i], b[i]
        table = [[int((x & y).sum()), int((x & ~y).sum())], [int((~x & y).sum()), int((~x & ~y).sum())]]
        g = got['tasks'][t]
        assert (g['n'], g['a_only'], g['b_only']) == (12, table[0][1], table[1][0])
        assert g['p_value'] == pytest.approx(mcnemar(table, exact=True).pvalue, abs=1e-12)
    psi = (got['a_only'] + got['b_only']) / got['n']
    from cream_nb.core.stats import connor_n
    if got['mdd'] is None: assert connor_n(psi, psi) > 24          # even delta = psi would need more than 24 questions
    else: assert connor_n(got['mdd'], psi) == pytest.approx(24)    # Connor's n at the reported MDD is the study's n
    assert 'arc_easy' in C.tests_text(tab) and 'Connor 1987' in C.tests_text(tab)

def test_judge_parse_rate(tmp_path):
    write_json({'n': 40, 'parsed': 30, 'unparseable': 10, 'mean_score': 3.1}, tmp_path/'iter1'/'judge_stats.json')
    write_json({'n': 0, 'parsed': 0, 'unparseable': 0}, tmp_path/'iter2'/'judge_stats.json')
    j = C.judge_table(tmp_path)
    assert j[1]['parse_rate'] == 0.75 and (j[1]['low'], j[1]['high']) == pytest.approx(proportion_confint(30, 40, method='wilson'), abs=1e-12)
    assert j[2]['parse_rate'] is None
    assert '30/40' in C.judge_text({'judge': {'srlm': j}}) and C.judge_text({'judge': {'dpo': {}}}) == ''

def test_statistics_from_the_committed_comparison():
    "cpu-demo.json stores no per-prompt values: the permutation p and bootstrap interval are None, the MDDs are computed from SD, n and counts."
    from statsmodels.stats.power import TTestIndPower
    tab = json.loads((Path(__file__).parents[1]/'data'/'compare'/'cpu-demo.json').read_text())['tables']
    st = C.table_statistics(tab)
    k, r = tab['consistency']['dpo']['2']['kendall'], tab['consistency']['cream-avg']['2']['kendall']
    s = st['consistency']['dpo']['2']['kendall']
    assert s['p_value'] is None and s['difference'] == pytest.approx(k['mean'] - r['mean'])
    sd = lambda c: c['std'] * math.sqrt(c['n'] / (c['n'] - 1))
    sp = math.sqrt((sd(k)**2 + sd(r)**2) / 2)
    assert s['mdd'] == pytest.approx(sp * TTestIndPower().solve_power(nobs1=16, ratio=1, alpha=0.05, power=0.8), rel=1e-4)
    assert st['paired_mdd']['dpo']['vs_reference'] is None           # 3 of 100 discordant
    text = C.compare_text(tab)
    assert 'Consistency against cream-avg' in text and 'mdd >3' in text and 'Self-reward accuracy vs gold' in text
    main, against = C.consistency_text(tab).split('\n\n')                # the note stays with the table it explains
    assert main.endswith('M_t is M_{t-1} unchanged, trained on no pairs') and against.startswith('Consistency against cream-avg')
    assert len(figures_.consistency_distribution_figure(tab).data) == 0 and len(figures_.compare_figures(tab)) == 3


def test_cut_responses_are_counted_per_iteration_and_shown(tmp_path):
    "A response is cut when it reached sampling.max_new_tokens with no end token (the stored ids exclude the end token)."
    from cream_nb.runs.summary import cut_responses
    from cream_nb.core.config import preset, save_config
    save_config(preset('tiny'), tmp_path/'config.json')
    mx = preset('tiny').sampling.max_new_tokens
    write_jsonl([{'prompt_id': 'a', 'responses': ['x'] * 4, 'response_token_ids': [[1] * mx, [1] * (mx - 1), [1] * 3, [1] * mx]},
                 {'prompt_id': 'b', 'responses': ['x'] * 4, 'response_token_ids': [[1] * 2] * 4}], tmp_path/'iter1'/'samples.jsonl')
    assert cut_responses(tmp_path/'iter1'/'samples.jsonl', mx) == {'responses': 8, 'cut': 2, 'share': 0.25, 'max_new_tokens': mx}
    assert cut_responses(tmp_path/'iter2'/'samples.jsonl', mx) is None
    rows = [dict(prompt_id=p, current=[1., 2., 3., 4.], previous=[4., 3., 2., 1.]) for p in 'ab']
    write_jsonl(rows, tmp_path/'iter1'/'rewards.jsonl'); write_json({'pairs': 2}, tmp_path/'iter1'/'pairs_stats.json')
    tab = C.consistency_table(tmp_path)
    assert tab[1]['cut']['share'] == 0.25
    row = next(l for l in C.consistency_text({'consistency': {'dpo': tab}, 'reward_accuracy': {}, 'movement': {}}).splitlines() if l.startswith('dpo '))
    assert row.split()[:4] == ['dpo', '1', '2', '25%']
