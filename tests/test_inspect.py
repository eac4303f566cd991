"""The inspectors (cream_nb.reporting.widgets) on a real tiny run and on hand-made run directories.

The tiny run (the session fixture `tiny_run`, made by the `cream` command) checks that what the inspectors
show is what the stages wrote. Its model has random weights, so no response is ever right: the filters on
correctness and the rank/tie rules are checked on small run directories written here by hand, where every
expected answer is known."""
import json, shutil
from pathlib import Path

import pytest
from scipy.stats import kendalltau

from cream_nb.core.config import preset, save_config
from cream_nb.stages.consistency import consistency_summary
from cream_nb.data.records import prompt_record
from cream_nb.data.answers import correctness, extract_answer
from cream_nb.core.artifacts import ArtifactError, read_json, read_jsonl, write_json, write_jsonl, load_dataset_dir
from cream_nb.stages.preferences import preference_pairs
from cream_nb.reporting import prompts as I
from cream_nb.reporting import figures as figures_
from cream_nb.reporting import widgets as widgets_


def hand_ranks(rewards):
    "Rank by hand: 1 + the number of strictly higher rewards (so ties share the best rank of their group)."
    return [None if r is None else 1 + sum(o is not None and o > r for o in rewards) for r in rewards]

def bins(hist):
    return list(zip(hist['edges'][:-1], hist['edges'][1:]))

# ---------------------------------------------------------------- the tiny run

@pytest.fixture(scope='module')
def run(tiny_run):
    return tiny_run[0]

@pytest.mark.slow
@pytest.mark.parametrize('t', [1, 2])
def test_prompt_view_shows_what_the_stages_wrote(run, t):
    d = run/f'iter{t}'
    prompts, samples = read_jsonl(d/'prompts.jsonl'), {s['prompt_id']: s for s in read_jsonl(d/'samples.jsonl')}
    rewards = {r['prompt_id']: r for r in read_jsonl(d/'rewards.jsonl')}
    rates = read_json(d/'consistency.json')['per_prompt']
    pairs = {r['prompt_id']: r for r in load_dataset_dir(d/'pairs')}
    ok = correctness(list(samples.values()), prompts)
    assert I.iterations(run) == [1, 2]
    for p in prompts:
        v = I.prompt_view(run, t, p['id'])
        rw = rewards[p['id']]
        assert [r['text'] for r in v['responses']] == samples[p['id']]['responses']
        assert [r['reward'] for r in v['responses']] == rw['current']
        assert [r['previous_reward'] for r in v['responses']] == rw['previous']
        assert [r['rank'] for r in v['responses']] == hand_ranks(rw['current'])
        assert [r['previous_rank'] for r in v['responses']] == hand_ranks(rw['previous'])
        assert v['c_x'] == rates[p['id']]
        assert (v['chosen'], v['rejected']) == (pairs[p['id']]['chosen_index'], pairs[p['id']]['rejected_index'])
        assert [r['index'] for r in v['responses'] if r['chosen']] == [pairs[p['id']]['chosen_index']]
        assert v['responses'][v['chosen']]['rank'] == 1                     # chosen = best by M_t's reward
        assert v['responses'][v['rejected']]['rank'] == len(v['responses'])  # rejected = worst
        labels = [c['label'] for c in p['choices']] or None
        assert [r['extracted'] for r in v['responses']] == [extract_answer(x, p['task'], labels) for x in samples[p['id']]['responses']]
        assert [r['correct'] for r in v['responses']] == ok[p['id']]
        assert v['gold'] == p['answer'] and v['task'] == p['task']
    assert v['reward_names'] == (('M1 reward', 'M0 normalised likelihood') if t == 1 else ('M2 reward', 'M1 reward'))

@pytest.mark.slow
def test_discordant_pairs_give_the_kendall_rate(run):
    "c_x = (tau + 1) / 2 and, without ties, tau = 1 - 2D/P: the slope chart's crossings are what lowers c_x."
    for t in (1, 2):
        for row in I.prompt_table(run, t):
            v = I.prompt_view(run, t, row['id'])
            cur, prev = [r['reward'] for r in v['responses']], [r['previous_reward'] for r in v['responses']]
            n = len(cur); P = n * (n - 1) // 2
            assert len(set(cur)) == n and len(set(prev)) == n, "real-valued rewards of the tiny run have no ties"
            tau = kendalltau(cur, prev).statistic
            D = len(I.discordant_pairs(cur, prev))
            assert D == round(P * (1 - tau) / 2)
            assert row['c_x'] == pytest.approx((tau + 1) / 2, abs=1e-12)
            fig = figures_.slope_figure(v)
            assert [list(tr.y) for tr in fig.data] == [[r['previous_rank'], r['rank']] for r in v['responses']]
            assert f"{D} of {P} pairs discordant" in fig.layout.title.text

@pytest.mark.slow
def test_table_and_filters_on_the_tiny_run(run):
    for t in (1, 2):
        d = run/f'iter{t}'
        table = I.prompt_table(run, t)
        assert [r['id'] for r in table] == [p['id'] for p in read_jsonl(d/'prompts.jsonl')]
        hist = read_json(d/'consistency.json')['summary']['histogram']
        assert [len(I.filter_prompts(table, c_range=b)) for b in bins(hist)] == hist['counts']
        for task in {r['task'] for r in table}:
            assert [r['id'] for r in I.filter_prompts(table, task=task)] == [r['id'] for r in table if r['task'] == task]
        # random weights: nothing is right, so no pair can go against the gold answer
        assert all(r['n_correct'] in (0, None) for r in table)
        assert all(r['disagrees'] is (None if r['gold'] is None else False) for r in table)
        assert I.filter_prompts(table, disagrees=True) == []

@pytest.mark.slow
def test_inspector_and_dashboard_on_the_tiny_run(run):
    dash = widgets_.Dashboard(run)
    ins = dash.inspector
    hist = dash.figures['Consistency rate per prompt']
    assert [tr.meta for tr in hist.data] == [1, 2]
    assert [list(tr.y) for tr in hist.data] == [read_json(run/f'iter{t}'/'consistency.json')['summary']['histogram']['counts'] for t in (1, 2)]
    pairs = load_dataset_dir(run/'iter2'/'pairs')
    assert list(dash.figures['Reward margins'].data[1].y) == pytest.approx([c - r for c, r in zip(pairs['chosen_reward'], pairs['rejected_reward'])])
    # the inspector starts on iteration 1's first prompt; next shows the second, with its responses
    ids = [r['id'] for r in I.prompt_table(run, 1)]
    assert (ins.iteration.value, ins.prompt_ids(), ins.current()['id']) == (1, ids, ids[0])
    ins.next_button.click()
    assert ins.current()['id'] == ids[1]
    assert f'data-prompt-id="{ids[1]}"' in ins.cards.value and ins.cards.value.count('class="cream-response"') == 4
    # a click on iteration 2's fullest bar lists that bar's prompts
    k = max(range(10), key=lambda i: hist.data[1].y[i])
    hist._js2py_pointsCallback = widgets_.click_message(1, k)
    a, b = hist.data[1].customdata[k]
    assert ins.iteration.value == 2 and ins.filters['c_range'] == (a, b)
    assert ins.prompt_ids() == [r['id'] for r in I.prompt_table(run, 2) if a <= r['c_x'] < b or (b == 1 and r['c_x'] == 1)]
    assert len(ins.prompt_ids()) == hist.data[1].y[k]
    assert ins.out.outputs == ()

# ---------------------------------------------------------------- hand-made run directories

def P(task, question, choices=None, answer=None): return prompt_record(task, question, choices, answer)

KNOWN = [  # (prompt, responses, M_t reward, M_{t-1} reward, c_x written in consistency.json)
    (P('arc_easy', 'Which is a bird?', dict(A='bat', B='owl', C='moth'), 'B'),
     ['Answer: B', 'Answer: A', 'so Answer: B', 'Answer: C'], [0.5, 2.0, 0.5, -1.0], [1.0, 0.0, 2.0, -1.0], 0.5),
    (P('arc_easy', 'Which is a metal?', dict(A='iron', B='wood', C='glass'), 'A'),
     ['Answer: A', 'Answer: B', 'Answer: C', 'so Answer: A'], [3.0, 1.0, 0.0, 2.0], [3.0, 1.0, 0.0, 2.0], 0.6),
    (P('gsm8k', 'What is 5 + 7?', answer=12),
     ['Answer: 12', 'it is Answer: 12', '5 + 7 = 12. Answer: 12', 'Answer: 12.0'], [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], 1.0),
    (P('oasst1', 'Write a haiku about rain.'),
     ['Rain taps', 'Grey sky', 'Wet leaves', 'Puddles'], [0.3, 0.1, 0.2, 0.0], [0.3, 0.1, 0.2, 0.0], 0.0),
    (P('gsm8k', 'What is 3 + 4?', answer=7),
     ['Answer: 7', 'Answer: 8', 'Answer: 9', 'so Answer: 7'], [0.1, 0.9, 0.5, 0.2], [0.2, 0.9, 0.5, 0.1], 0.55),
]
IDS = [k[0]['id'] for k in KNOWN]

def write_iteration(run_dir, t=1, known=KNOWN, method='cream', stages=('rewards', 'consistency', 'pairs')):
    "Write iteration t of a hand-made run in CreamRun's format (only the stages named after sampling)."
    d = Path(run_dir)/f'iter{t}'
    cfg = preset('tiny'); cfg.loop.method = method
    save_config(cfg, Path(run_dir)/'config.json')
    prompts = [k[0] for k in known]
    samples = [{'prompt_id': p['id'], 'responses': r, 'response_token_ids': [[1]] * len(r)} for p, r, *_ in known]
    write_jsonl(prompts, d/'prompts.jsonl'); write_jsonl(samples, d/'samples.jsonl')
    if 'rewards' in stages:
        write_jsonl([{'prompt_id': p['id'], 'current': cur, 'previous': prev if method in ('cream', 'dpo') else None}
                     for p, _, cur, prev, _ in known], d/'rewards.jsonl')
    rates = {p['id']: c for p, *_, c in known} if method in ('cream', 'dpo') else {}
    if 'consistency' in stages:
        write_json({'method': 'kendall', 'per_prompt': rates, 'set': sum(rates.values()) / len(rates) if rates else None,
                    'summary': consistency_summary(rates) if rates else None, 'training': 'dyn'}, d/'consistency.json')
    if 'pairs' in stages:
        from cream_nb.core.artifacts import save_dataset
        ds, stats = preference_pairs(prompts, samples, {p['id']: cur for p, _, cur, *_ in known}, rates=rates or None)
        save_dataset(ds, d/'pairs'); write_json(stats, d/'pairs_stats.json')
    return Path(run_dir)

@pytest.fixture
def hand(tmp_path):
    return write_iteration(tmp_path/'hand')

def test_rank_rule_min_for_ties():
    assert I.reward_ranks([0.5, 2.0, 0.5, -1.0]) == [2, 1, 2, 4]
    assert I.reward_ranks([1.0, None, 1.0, 1.0]) == [1, None, 1, 1]
    assert I.reward_ranks([0.1, 0.9, 0.5, 0.2]) == [4, 1, 2, 3]
    assert I.reward_ranks(None, 2) == [None, None]
    for r in ([3, 1, 3, 2, 1], [0.0] * 5, [5, 4, 3, 2, 1]): assert I.reward_ranks(r) == hand_ranks(r)

def test_prompt_view_of_a_known_prompt(hand):
    v = I.prompt_view(hand, 1, IDS[0])
    rows = v['responses']
    assert [r['rank'] for r in rows] == [2, 1, 2, 4] and [r['previous_rank'] for r in rows] == [2, 3, 1, 4]
    assert [r['extracted'] for r in rows] == ['B', 'A', 'B', 'C'] and [r['correct'] for r in rows] == [True, False, True, False]
    assert (v['chosen'], v['rejected'], v['disagrees'], v['c_x'], v['gold']) == (1, 3, True, 0.5, 'B')
    assert [(r['chosen'], r['rejected']) for r in rows] == [(False, False), (True, False), (False, False), (False, True)]
    assert v['choices'] == {'A': 'bat', 'B': 'owl', 'C': 'moth'} and v['question'] == 'Which is a bird?'
    assert I.discordant_pairs([r['reward'] for r in rows], [r['previous_reward'] for r in rows]) == [(0, 1), (1, 2)]
    assert [s['discordant_with'] for s in I.rank_slopes(v)] == [[1], [0, 2], [1], []]
    html = I.prompt_html(v)
    assert html.count('class="cream-response"') == 4 and 'the pair disagrees with the gold answer' in html
    assert 'M1 reward: 2.000 (rank 1)' in html and 'M0 normalised likelihood: 0.000 (rank 3)' in html
    g = I.prompt_view(hand, 1, IDS[2])   # gsm8k, every response right (12.0 is read as the number 12)
    assert [r['extracted'] for r in g['responses']] == ['12', '12', '12', '12'] and all(r['correct'] for r in g['responses'])
    assert (g['chosen'], g['rejected'], g['disagrees']) == (3, 0, False)
    o = I.prompt_view(hand, 1, IDS[3])   # open question: no answer to extract, nothing to disagree with
    assert [r['extracted'] for r in o['responses']] == [None] * 4 and o['disagrees'] is None and o['gold'] is None

def test_table_and_disagreement(hand):
    table = I.prompt_table(hand, 1)
    assert [r['id'] for r in table] == IDS
    assert [r['disagrees'] for r in table] == [True, False, False, None, True]
    assert [r['n_correct'] for r in table] == [2, 2, 4, None, 2]
    assert [(r['chosen'], r['rejected']) for r in table] == [(1, 3), (0, 2), (3, 0), (0, 3), (1, 0)]
    assert [r['c_x'] for r in table] == [0.5, 0.6, 1.0, 0.0, 0.55]

def test_filters_select_the_right_prompts(hand):
    table = I.prompt_table(hand, 1)
    ids = lambda **kw: [r['id'] for r in I.filter_prompts(table, **kw)]
    assert ids() == IDS
    assert ids(disagrees=True) == [IDS[0], IDS[4]] and ids(disagrees=False) == [IDS[1], IDS[2]]
    assert ids(c_range=(0.5, 0.6)) == [IDS[0], IDS[4]]          # 0.6 belongs to the next bin
    assert ids(c_range=(0.6, 0.7)) == [IDS[1]]
    assert ids(c_range=(0.9, 1.0)) == [IDS[2]]                  # the last bin is closed at 1
    assert ids(c_range=(0.0, 0.1)) == [IDS[3]]
    assert ids(task='gsm8k') == [IDS[2], IDS[4]] and ids(task='siqa') == []
    assert ids(task='gsm8k', disagrees=True) == [IDS[4]]
    assert ids(text='BIRD') == [IDS[0]] and ids(text='what is') == [IDS[2], IDS[4]] and ids(text=IDS[3][:10]) == [IDS[3]]
    hist = consistency_summary({k[0]['id']: k[4] for k in KNOWN})['histogram']
    assert [len(I.filter_prompts(table, c_range=b)) for b in bins(hist)] == hist['counts']

def test_inspector_navigation_and_filters(hand):
    ins = widgets_.PromptInspector(hand)
    assert ins.prompt_ids() == IDS and ins.current()['id'] == IDS[0]
    assert ins.prev_button.disabled and not ins.next_button.disabled
    for k in range(1, 5):
        ins.next_button.click(); assert ins.current()['id'] == IDS[k]
    assert ins.next_button.disabled
    ins.next_button.click(); assert ins.current()['id'] == IDS[4]   # stays at the end
    ins.prev_button.click(); assert ins.current()['id'] == IDS[3]
    assert (ins.task.value, ins.disagree.value) == ('', 'any')       # 'all tasks', 'any' (a None value shows as blank in a browser)
    ins.disagree.value = 'disagrees'                                 # the control, as a user sets it
    assert ins.prompt_ids() == [IDS[0], IDS[4]] and ins.current()['id'] == IDS[0]
    ins.task.value = 'gsm8k'
    assert ins.prompt_ids() == [IDS[4]]
    assert [r['rank'] for r in ins.current()['responses']] == [4, 1, 2, 3]
    assert ins.ranks.discordant() == [(0, 3)]
    ins.set_filters(task=None, disagrees=None, c_range=(0.5, 0.6))
    assert ins.prompt_ids() == [IDS[0], IDS[4]] and (ins.c_range.value, ins.task.value, ins.disagree.value) == ((0.5, 0.6), '', 'any')
    ins.set_filters(disagrees=False)
    assert ins.prompt_ids() == [] and ins.disagree.value == 'agrees'       # 0.5 and 0.55 both disagree
    ins.disagree.value = 'any'
    ins.search.value = 'bird'
    assert ins.prompt_ids() == [IDS[0]]
    ins.set_filters(text='nothing like this')
    assert ins.prompt_ids() == [] and ins.current() is None and 'passes these filters' in ins.position.value
    assert ins.out.outputs == ()

def test_click_on_a_histogram_bar_filters_the_inspector(hand):
    write_iteration(hand, t=2, known=KNOWN[::-1])
    dash = widgets_.Dashboard(hand)
    hist = dash.figures['Consistency rate per prompt']
    assert [tr.meta for tr in hist.data] == [1, 2]
    assert list(hist.data[0].y) == [1, 0, 0, 0, 0, 2, 1, 0, 0, 1]
    hist._js2py_pointsCallback = widgets_.click_message(1, 5)    # iteration 2, bin [0.5, 0.6)
    assert dash.inspector.iteration.value == 2 and dash.inspector.prompt_ids() == [IDS[4], IDS[0]]
    hist._js2py_pointsCallback = widgets_.click_message(0, 9)    # iteration 1, bin [0.9, 1.0]
    assert dash.inspector.iteration.value == 1 and dash.inspector.prompt_ids() == [IDS[2]]
    assert dash.inspector.current()['id'] == IDS[2]
    assert dash.out.outputs == () and dash.inspector.out.outputs == ()

def test_method_without_previous_ranking(tmp_path):
    run = write_iteration(tmp_path/'srlm', method='srlm')
    v = I.prompt_view(run, 1, IDS[0])
    assert v['reward_names'] == ('M1 judge score', None) and v['c_x'] is None
    assert [r['previous_rank'] for r in v['responses']] == [None] * 4 and [r['rank'] for r in v['responses']] == [2, 1, 2, 4]
    fig = figures_.slope_figure(v)
    assert len(fig.data) == 0 and fig.layout.title.text == 'No previous ranking (M1 judge score)'
    table = I.prompt_table(run, 1)
    assert I.filter_prompts(table, c_range=(0.0, 1.0)) == [] and len(I.filter_prompts(table)) == 5
    ins = widgets_.PromptInspector(run)
    assert len(ins.ranks.widget.data) == 0 and 'M1 judge score: 2.000 (rank 1)' in ins.cards.value

def test_run_in_progress_is_read_again(tmp_path):
    run = write_iteration(tmp_path/'live', stages=())          # sampled, not scored yet
    table = I.prompt_table(run, 1)
    assert [(r['c_x'], r['chosen'], r['disagrees']) for r in table] == [(None, None, None)] * 5
    assert [r['rank'] for r in I.prompt_view(run, 1, IDS[0])['responses']] == [None] * 4
    dash = widgets_.Dashboard(run)
    assert len(dash.figures['Consistency rate per prompt'].data) == 0 and dash.inspector.prompt_ids() == IDS
    write_iteration(run)                                        # the score, consistency and pairs stages finish
    dash.refresh_button.click()
    assert list(dash.figures['Consistency rate per prompt'].data[0].y) == [1, 0, 0, 0, 0, 2, 1, 0, 0, 1]
    assert dash.inspector.current()['responses'][1]['rank'] == 1 and dash.inspector.table()[0]['disagrees'] is True
    assert I.prompt_table(run, 1)[0]['c_x'] == 0.5

def test_errors_name_the_file(hand, tmp_path):
    with pytest.raises(KeyError, match=r"prompt 'nope' is not in .*iter1/prompts.jsonl"): I.prompt_view(hand, 1, 'nope')
    with pytest.raises(ArtifactError, match=r"iter2/prompts.jsonl is missing: iteration 2 has not started \(iterations present: \[1\]\)"):
        I.prompt_table(hand, 2)
    with pytest.raises(ValueError, match=r"iteration 3 is not in .*: iterations present are \[1\]"): widgets_.PromptInspector(hand, t=3)
    with pytest.raises(KeyError, match=r"prompt 'nope' is not in .*iter1/prompts.jsonl"): widgets_.PromptInspector(hand, t=1, prompt_id='nope')
    assert widgets_.PromptInspector(hand, prompt_id=IDS[3]).current()['id'] == IDS[3]
    with pytest.raises(ArtifactError, match='has no iteration with prompts yet'): widgets_.PromptInspector(tmp_path)
    with pytest.raises(ArtifactError, match='is not a run directory'): I.iterations(tmp_path/'nowhere')
    (hand/'iter1'/'rewards.jsonl').write_text('{"prompt_id": "x"}\nnot json\n')
    with pytest.raises(ArtifactError, match=r"rewards.jsonl line 2 is corrupt"): I.prompt_table(hand, 1)

def test_callback_errors_land_in_the_output_widget(hand):
    ins = widgets_.PromptInspector(hand)
    (hand/'iter1'/'samples.jsonl').write_text('{"prompt_id": ')
    ins.next_button.click()                                     # the button's callback reads the corrupt file
    assert len(ins.out.outputs) == 1
    assert ins.out.outputs[0]['name'] == 'stderr' and 'samples.jsonl line 1 is corrupt' in ins.out.outputs[0]['text']
