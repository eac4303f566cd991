"""cream_nb.stages.preferences: pair selection on hand-made rewards (ties, None, identical text), id alignment, the Dataset schema."""
import numpy as np, pytest
from datasets import Dataset
from cream_nb.stages.consistency import consistency_rates, set_consistency
from cream_nb.core.artifacts import save_dataset, load_dataset_dir
from cream_nb.stages.preferences import best_worst, preference_pairs

COLUMNS = ['prompt_id', 'prompt', 'chosen', 'rejected', 'chosen_index', 'rejected_index', 'chosen_reward',
           'rejected_reward', 'prompt_consistency', 'set_consistency', 'ref_chosen_logps', 'ref_rejected_logps']


def _prompt(pid, text=None):
    return {'id': pid, 'messages': [{'role': 'user', 'content': text or f'question {pid}'}], 'task': 'arc_easy',
            'choices': [{'label': 'A', 'text': 'x'}], 'answer': 'A'}


def _sample(pid, n):
    return {'prompt_id': pid, 'responses': [f'{pid}: response {j}' for j in range(n)], 'response_token_ids': [[j] for j in range(n)]}


def test_best_worst_on_hand_made_rewards():
    assert best_worst([1.0, 3.0, 2.0]) == (1, 0, None)
    assert best_worst([2.0, 9.0, 9.0, -1.0, -1.0]) == (1, 3, None)          # ties: lowest index of the tied best / worst
    assert best_worst([-1.0, 0.0, -1.0, 0.0]) == (1, 0, None)
    assert best_worst([0.25, 0.25]) == (None, None, 'equal_rewards')
    assert best_worst([3, None, 3, None]) == (None, None, 'equal_rewards')
    assert best_worst([None, None, 4]) == (None, None, 'unscored')           # one scored response is no ranking
    assert best_worst([None, 1, None, 5, 2]) == (3, 1, None)
    assert best_worst([np.float32(0.5), np.float64(0.1), 2]) == (2, 1, None)
    for bad in (float('inf'), float('nan'), 'high', True):
        with pytest.raises(ValueError, match="prompt 'p': reward 1 is"): best_worst([0.0, bad], 'p')


def test_best_worst_matches_definition_on_random_ties():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(2, 9))
        r = [None if rng.random() < 0.15 else float(rng.integers(0, 4)) for _ in range(n)]
        scored = [v for v in r if v is not None]
        got = best_worst(r)
        if len(scored) < 2: assert got == (None, None, 'unscored')
        elif max(scored) == min(scored): assert got == (None, None, 'equal_rewards')
        else: assert got == (r.index(max(scored)), r.index(min(scored)), None)


def test_pairs_on_hand_made_rewards():
    prompts = [_prompt(p) for p in ('a', 'b', 'c', 'd', 'e', 'f', 'g')]
    samples = [_sample(p, 4) for p in ('a', 'b', 'c', 'd', 'e', 'g')]      # f: no samples
    samples[4]['responses'] = ['same', 'other', 'same', 'x']                 # e: best and worst identical text
    rewards = {'a': [0.1, 0.4, -0.3, 0.2],         # best 1, worst 2
               'b': [1.0, 1.0, 1.0, 1.0],          # all equal -> skipped
               'c': [5.0, 2.0, 5.0, 2.0],          # ties: best {0, 2} -> 0, worst {1, 3} -> 1
               'd': [None, 0.3, None, None],       # one scored -> skipped
               'e': [0.9, 0.5, 0.1, 0.3],          # best 0 'same', worst 2 'same' -> skipped
               'f': [1.0, 2.0, 3.0, 4.0]}          # g: no rewards
    rates = {'a': 0.7, 'b': 0.1, 'c': 0.2, 'd': 0.3, 'e': 0.4, 'f': 0.5, 'g': 0.6}
    ref = {p: [-20.0 + j for j in range(4)] for p in rewards}
    pairs, stats = preference_pairs(prompts, samples, rewards, rates, ref_logps=ref)
    assert stats == {'prompts': 7, 'pairs': 2, 'skipped_equal_rewards': 1, 'skipped_identical_text': 1,
                     'skipped_unscored': 1, 'missing': 2, 'set_consistency': pytest.approx(2.8 / 7),
                     'mean_chosen_tokens': 1.0, 'mean_rejected_tokens': 1.0}   # every response of _sample is one token
    assert pairs.column_names == COLUMNS
    rows = pairs.to_list()
    assert [(r['prompt_id'], r['chosen_index'], r['rejected_index']) for r in rows] == [('a', 1, 2), ('c', 0, 1)]
    assert [(r['chosen'], r['rejected']) for r in rows] == [('a: response 1', 'a: response 2'), ('c: response 0', 'c: response 1')]
    assert [(r['chosen_reward'], r['rejected_reward']) for r in rows] == [(0.4, -0.3), (5.0, 2.0)]
    assert [r['prompt_consistency'] for r in rows] == [0.7, 0.2]
    assert [r['set_consistency'] for r in rows] == [pytest.approx(0.4)] * 2
    assert [(r['ref_chosen_logps'], r['ref_rejected_logps']) for r in rows] == [(-19.0, -18.0), (-20.0, -19.0)]
    assert rows[0]['prompt'] == [{'role': 'user', 'content': 'question a'}]
    # an explicit C wins over the mean of the rates
    pairs2, stats2 = preference_pairs(prompts, samples, rewards, rates, set_rate=0.25)
    assert pairs2['set_consistency'] == [0.25, 0.25] and stats2['set_consistency'] == 0.25
    assert 'ref_chosen_logps' not in pairs2.column_names


def test_no_rates_means_plain_dpo_weights():
    prompts, samples = [_prompt('a'), _prompt('b')], [_sample('a', 3), _sample('b', 3)]
    pairs, stats = preference_pairs(prompts, samples, {'a': [1, 2, 3], 'b': [3, 2, 1]})
    assert pairs['prompt_consistency'] == [1.0, 1.0] and pairs['set_consistency'] == [1.0, 1.0]
    assert stats['set_consistency'] == 1.0 and pairs['chosen_index'] == [2, 0] and pairs['rejected_index'] == [0, 2]


def test_alignment_under_skipped_prompts():
    "Rates and reference log-probs follow their prompt id, however many prompts before it were skipped."
    rng = np.random.default_rng(5)
    ids = [f'gsm8k-{i:012x}' for i in range(60)]
    cur = {p: rng.normal(size=5).round(2).tolist() for p in ids}
    for p in ids[3:60:7]: cur[p] = [0.5] * 5                                   # every 7th prompt gives no pair
    prev = {p: rng.normal(size=5).tolist() for p in ids}
    rates = consistency_rates(cur, prev)
    ref = {p: rng.normal(-30, 5, size=5).tolist() for p in ids}
    samples = [_sample(p, 5) for p in reversed(ids)]                          # order of samples does not matter
    pairs, stats = preference_pairs([_prompt(p) for p in ids], samples, cur, rates, ref_logps=ref)
    assert stats['skipped_equal_rewards'] == len(ids[3:60:7]) and stats['pairs'] == len(ids) - len(ids[3:60:7])
    for r in pairs:
        p = r['prompt_id']
        assert r['prompt_consistency'] == rates[p]
        assert r['chosen_index'] == int(np.argmax(cur[p])) and r['rejected_index'] == int(np.argmin(cur[p]))
        assert r['ref_chosen_logps'] == ref[p][r['chosen_index']] and r['ref_rejected_logps'] == ref[p][r['rejected_index']]
        assert r['chosen'] == f'{p}: response {r["chosen_index"]}'
    assert pairs['set_consistency'][0] == pytest.approx(set_consistency(rates), abs=1e-15)


def test_dataset_prompts_empty_result_and_round_trip(tmp_path):
    prompts = Dataset.from_list([_prompt('a'), _prompt('b')])
    empty, stats = preference_pairs(prompts, [_sample('a', 2)], {'a': [1.0, 1.0]}, ref_logps={'a': [-1.0, -2.0]})
    assert len(empty) == 0 and empty.column_names == COLUMNS and stats['missing'] == 1 and stats['skipped_equal_rewards'] == 1
    pairs, _ = preference_pairs(prompts, [_sample('a', 2), _sample('b', 3)], {'a': [1.0, 2.0], 'b': [0.0, -1.0, 1.0]},
                                {'a': 0.25, 'b': 0.75}, ref_logps={'a': [-1.0, -2.0], 'b': [-3.0, -4.0, -5.0]})
    assert pairs.features['chosen_index'].dtype == 'int64' and pairs.features['prompt_consistency'].dtype == 'float64'
    back = load_dataset_dir(save_dataset(pairs, tmp_path / 'pairs'))
    assert back.to_list() == pairs.to_list() and back.to_list()[1]['chosen_index'] == 2


def test_bad_inputs_name_the_problem():
    prompts, samples, rewards = [_prompt('a'), _prompt('b')], [_sample('a', 3), _sample('b', 3)], {'a': [1, 2, 3], 'b': [3, 1, 2]}
    cases = [
        (dict(prompts=[{'id': 'a'}]), "prompts row 0: missing field 'messages'"),
        (dict(prompts=[_prompt('a'), _prompt('a')]), "prompts row 1: prompt id 'a' appears twice"),
        (dict(samples=[_sample('a', 3), {'prompt_id': 'b'}]), "samples row 1: missing field 'responses'"),
        (dict(samples=[_sample('a', 3), _sample('a', 3)]), "samples row 1: prompt id 'a' appears twice"),
        (dict(samples=samples + [_sample('z', 3)]), "samples has 1 prompt id(s) that are not among the prompts"),
        (dict(rewards={**rewards, 'b': [1, 2]}), "prompt 'b': 2 rewards for 3 responses"),
        (dict(rewards={**rewards, 'b': [1, 'x', 2]}), "prompt 'b': reward 1 is 'x'"),
        (dict(rates={'a': 0.5}), "rates has no entry for prompt 'b'"),
        (dict(rates={'a': 0.5, 'b': float('nan')}), "prompt 'b' has nan"),
        (dict(rates={'a': 0.5, 'b': 1.5}, set_rate=0.5), "rates['b'] is 1.5"),
        (dict(rates={'a': 0.5, 'b': 0.5}, set_rate=-1), "set_rate is -1"),
        (dict(ref_logps={'a': [0, 0, 0]}), "ref_logps has no entry for prompt 'b'"),
        (dict(ref_logps={'a': [0, 0, 0], 'b': [0, 0]}), "prompt 'b': 2 reference log-probs for 3 responses"),
        (dict(ref_logps={'a': [0, 0, 0], 'b': [None, 0, 0]}), "prompt 'b': reference log-prob of response 0 is None"),
        (dict(ref_logps={'a': [0, 0, 0], 'b': [0, 0, 0], 'c': [0]}), "ref_logps has 1 prompt id(s) that are not among"),
    ]
    for kw, msg in cases:
        args = dict(prompts=prompts, samples=samples, rewards=rewards) | kw
        with pytest.raises(ValueError) as e: preference_pairs(**args)
        assert msg in str(e.value), (kw, str(e.value))
