"Answer extraction, matching, accuracy tables and reward diagnostics (cream_nb.stages.evaluate)."
import json, re
from pathlib import Path
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.stats import mannwhitneyu

from cream_nb.data.answers import extract_answer, answers_match, correctness, EXTRACT_TASKS, MC_LABELS
from cream_nb.stages.evaluate import accuracy_table, reward_accuracy, iteration_reward_accuracy
from cream_nb.core.artifacts import write_jsonl

DIGITS = ['1', '2', '3', '4']

# (task, labels, response, expected extraction); every expectation written by hand
CASES = [
    # --- multiple choice: explicit "Answer:" / "answer is"
    ('arc_easy', None, 'Answer: B', 'B'),
    ('arc_easy', None, 'Answer: (b).', 'B'),
    ('arc_easy', None, 'answer: c', 'C'),
    ('arc_easy', None, 'ANSWER: [D]', 'D'),
    ('arc_challenge', None, 'The answer is E.', 'E'),
    ('arc_challenge', None, 'The correct answer would be (A) because it melts.', 'A'),
    ('openbookqa', None, '**Answer:** C) the moon', 'C'),
    ('openbookqa', None, 'Final answer: option D', 'D'),
    ('openbookqa', None, 'Answer:\n\nB. Sunlight', 'B'),
    ('siqa', None, 'answer is a', 'A'),
    ('siqa', None, 'Answer: A.', 'A'),
    ('arc_easy', None, 'Answer: A is correct, since plants make food.', 'A'),
    # the model's own answer counts, not the one it gives to a question it goes on to invent
    ('arc_easy', None, 'Answer: B\n\nQuestion: What is ice?\nAnswer: D', 'B'),
    # the last answer marker wins (issue 12)
    ('arc_easy', None, 'I initially thought the answer is A, but actually the answer is C.', 'C'),
    ('openbookqa', None, 'The answer is (B). On reflection, the answer is D.', 'D'),
    # 'A' before a line break is option A, not the article (issue 12)
    ('arc_easy', None, 'Answer: A\n\nExplanation: the liver filters blood.', 'A'),
    ('arc_easy', None, 'A\nThe liver is the largest organ.', 'A'),
    # a response that only repeats the option list chooses nothing (issue 12)
    ('arc_easy', None, 'A. molten rocks.\nB. igneous rocks.\nC. sedimentary rocks.\nD. metamorphic rocks.', None),
    ('siqa', None, 'A) be rude\nB) be mean\nC) ask that Sasha buy another one', None),
    ('arc_easy', None, 'A. molten rocks.\nB. igneous rocks.\n\nThe correct answer is:\n\nB. igneous rocks.', 'B'),
    ('siqa', None, '1. The correct answer is A.\n2. The correct answer is B.\n3. The correct answer is C.', None),
    # "Answer:" followed by prose, the explicit answer comes later
    ('arc_easy', None, 'Answer: A ball rolls faster on ice. So the answer is (C).', 'C'),
    # --- the article "A" is not option A
    ('arc_easy', None, 'A ball rolls down the ramp because of gravity.', None),
    ('arc_challenge', None, 'Answer: A plant needs light', None),
    ('arc_easy', None, 'A ball rolls down the ramp. The answer is A.', 'A'),
    ('arc_easy', None, 'Rolling a ball is A.', 'A'),
    # --- fallback: last standalone label
    ('arc_challenge', None, 'Option B is wrong and so is D; I would pick C', 'C'),
    ('arc_easy', None, 'I think (B) fits best.', 'B'),
    ('arc_easy', None, 'B', 'B'),
    ('arc_easy', None, '  (d). ', 'D'),
    ('openbookqa', None, 'e.g. rain, snow and hail', None),
    ('openbookqa', None, 'It is E', None),                   # E is not an OpenBookQA label
    ('siqa', None, 'Answer: D', None),                       # SIQA has three options
    ('siqa', None, 'Maybe choice c?', 'C'),
    ('arc_easy', None, 'The U.S.A. uses coal.', None),
    ('arc_easy', None, "Vitamin B's role is clear", None),
    # --- ARC questions labelled 1-4
    ('arc_easy', DIGITS, 'Answer: 3', '3'),
    ('arc_easy', DIGITS, 'Answer: (2).', '2'),
    ('arc_easy', DIGITS, 'About 4 of the 10 students agree, so (2).', '2'),
    ('arc_easy', DIGITS, 'There are 3 reasons.', None),       # a number in a sentence is no label
    ('arc_easy', DIGITS, 'The answer is 10 minutes.', None),  # '1' inside '10'
    ('arc_easy', DIGITS, 'It is option 4', '4'),
    ('arc_easy', DIGITS, 'Answer: B', None),                  # letters are not this question's labels
    ('arc_easy', DIGITS, '1', '1'),
    ('arc_challenge', ['A', 'B', 'C'], 'Answer: D', None),
    ('arc_challenge', ['A', 'B', 'C', 'D', 'E'], 'Answer: e', 'E'),
    # --- GSM8K
    ('gsm8k', None, 'Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18', '18'),
    ('gsm8k', None, 'She makes 9 * 2 = 18 dollars. So the answer is 18.', '18'),
    ('gsm8k', None, 'Answer: $1,250.00', '1250'),
    ('gsm8k', None, 'The answer is 18.0', '18'),
    ('gsm8k', None, 'The answer is 18.00.', '18'),
    ('gsm8k', None, 'It drops 4.5 degrees to -2.5 degrees.', '-2.5'),
    ('gsm8k', None, '#### -7', '-7'),
    ('gsm8k', None, 'Answer: 3 + 4 = 7', '7'),
    # an equation after the marker that states its result first (issue 12)
    ('gsm8k', None, 'The answer is 15 = 10 + 5.', '15'),
    ('gsm8k', None, 'The answer is 12. No wait, 5 + 9 = 14, so the answer is 14.', '14'),
    ('gsm8k', None, '#### 12\n\nQuestion: And for 3 eggs?\n#### 99', '12'),
    ('gsm8k', None, 'Answer: 18 apples, because she had 20 and gave 2 away', '18'),
    ('gsm8k', None, 'Answer: There are 15 trees. 21 - 15 = 6. So the answer is 6.\n\nQuestion: 3 cars?\nAnswer: 3 + 2 = 5. So the answer is 5.', '6'),
    ('gsm8k', None, 'The total is 1,000,000 grains.', '1000000'),
    ('gsm8k', None, 'So the result is \\boxed{42}.', '42'),
    ('gsm8k', None, 'The answer is: **$75**', '75'),
    ('gsm8k', None, 'He had 10 - 4 left', '4'),                # '- 4' with a space is subtraction, not -4
    ('gsm8k', None, 'They split 12 cookies, 3 each, between 4 kids', '4'),
    ('gsm8k', None, 'I cannot tell.', None),
    ('gsm8k', None, '', None),
    ('gsm8k', None, 'Answer: unknown', None),
    ('gsm8k', None, 'v1.2 of the model', None),
]

@pytest.mark.parametrize('task,labels,text,expected', CASES)
def test_extract_answer(task, labels, text, expected):
    assert extract_answer(text, task, labels) == expected

# Real responses of the embedded SmolLM2-135M-Instruct (greedy, 64 new tokens) to offline test questions, each
# with the answer a reader takes from it (`why` says why) and what the extractor before issue 12 gave.
REAL = json.loads((Path(__file__).parent/'fixtures'/'smollm2_eval_responses.json').read_text())

@pytest.mark.parametrize('case', REAL, ids=[c['id'] for c in REAL])
def test_extract_answer_real_smollm2_responses(case):
    assert extract_answer(case['response'], case['task']) == case['expected'], case['why']

def test_real_responses_cover_the_defects():
    "The fixture holds responses the old extractor misread: option lists read as their last option, several answers."
    misread = [c for c in REAL if c['previous_extractor'] != c['expected']]
    assert len(misread) >= 15 and sum(c['expected'] is None for c in misread) >= 12
    assert {c['task'] for c in REAL} == {'arc_easy', 'arc_challenge', 'openbookqa', 'siqa'}

def test_enough_hand_written_cases():
    assert len(CASES) >= 40 and {c[0] for c in CASES} == {'arc_easy', 'arc_challenge', 'openbookqa', 'siqa', 'gsm8k'}

MARKERS = ['Answer:', 'answer is', '####', '\\boxed{', '(', ')', '$', '-', ',', '.', 'option ', 'A ', 'a', 'B', '1', '2.50',
           '1,000', '=', '\n', ' ', '*', 'e.g.', 'é', '٣', '\x00']

@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from(MARKERS) | st.text(max_size=3)).map(''.join)),
       st.sampled_from(EXTRACT_TASKS),
       st.one_of(st.none(), st.lists(st.sampled_from(['A', 'B', 'C', '1', '2', '(', '.*', 'x y']), min_size=1, unique=True)))
def test_extract_answer_never_raises(text, task, labels):
    got = extract_answer(text, task, None if task == 'gsm8k' else labels)
    if got is None: return
    if task == 'gsm8k': assert re.fullmatch(r'-?[0-9]+(\.[0-9]*[1-9])?', got), got   # normalised: no ',', '$' or zero fraction
    else: assert got in (labels or MC_LABELS[task])

def test_extract_answer_bad_arguments():
    with pytest.raises(ValueError, match="task 'mmlu' has no answer format"): extract_answer('Answer: A', 'mmlu')
    with pytest.raises(ValueError, match='non-empty list of option labels'): extract_answer('A', 'arc_easy', 'ABCD')
    with pytest.raises(TypeError, match='expects a response string'): extract_answer(3, 'gsm8k')
    assert extract_answer(None, 'gsm8k') is None

@pytest.mark.parametrize('pred,gold,task,expected', [
    ('18', '18.0', 'gsm8k', True), ('18', '18', 'gsm8k', True), ('1000', '1,000', 'gsm8k', True),
    ('18', 'Janet sells 9 eggs and makes 9 * 2 = $<<9*2=18>>18.\n#### 18', 'gsm8k', True),
    ('-3', '3', 'gsm8k', False), ('2.5', '2', 'gsm8k', False), ('0.5', '0.50', 'gsm8k', True),
    (None, '18', 'gsm8k', False), ('b', 'B', 'arc_easy', True), ('C', 'B', 'arc_easy', False), ('3', '3', 'arc_easy', True)])
def test_answers_match(pred, gold, task, expected):
    assert answers_match(pred, gold, task) is expected

def test_answers_match_bad_gold():
    with pytest.raises(ValueError, match="gold answer 'many' of a gsm8k prompt is not a number"): answers_match('3', 'many', 'gsm8k')
    with pytest.raises(ValueError, match='gold answer is None'): answers_match('A', None, 'siqa')

def test_accuracy_table():
    rows = ([{'task': 'arc_easy', 'correct': c} for c in [True, True, True, False]] +
            [{'task': 'gsm8k', 'correct': c, 'prediction': '1'} for c in [False] * 9 + [True]])
    t = accuracy_table(rows)
    assert t['tasks'] == {'arc_easy': {'accuracy': 0.75, 'correct': 3, 'n': 4}, 'gsm8k': {'accuracy': 0.1, 'correct': 1, 'n': 10}}
    assert t['macro_accuracy'] == pytest.approx(0.425)       # (0.75 + 0.1) / 2, not 4/14
    json.dumps(t)                                            # goes into metrics.json as it is
    assert accuracy_table([]) == {'tasks': {}, 'macro_accuracy': None}
    with pytest.raises(ValueError, match="prediction row 1 field 'correct' must be true/false"):
        accuracy_table([{'task': 'siqa', 'correct': True}, {'task': 'siqa', 'correct': 1}])

def test_reward_accuracy_by_hand():
    # p1: correct rewards {5, 2}, incorrect {3}: 5>3 won, 2<3 lost -> 1 of 2; margins 2, -1
    # p2: correct {1}, incorrect {1, 0}: tie (0.5), won (1) -> 1.5 of 2; margins 0, 1
    res = reward_accuracy({'p1': [5, 3, 2], 'p2': [1, 1, 0], 'p3': [0, 9], 'extra': [1.0]},
                          {'p1': [True, False, True], 'p2': [True, False, False], 'p3': [False, False]})
    assert res == {'accuracy': 2.5 / 4, 'mean_margin': 0.5, 'pairs': 4, 'prompts': 2,
                   'prompts_all_correct': 0, 'prompts_all_wrong': 1, 'unscored_responses': 0}
    assert reward_accuracy({}, {})['accuracy'] is None
    # SRLM: an unparseable judgement (None) is left out, never counted as 0: p1 keeps 5 > 3 only
    res = reward_accuracy({'p1': [5, 3, None]}, {'p1': [True, False, True]})
    assert (res['accuracy'], res['pairs'], res['unscored_responses']) == (1.0, 1, 1)

def test_reward_accuracy_matches_mann_whitney():
    rng = np.random.default_rng(1)
    rewards = {f'p{i}': np.round(rng.normal(size=8), 1).tolist() for i in range(40)}   # rounded: some ties
    correct = {k: (rng.random(8) < 0.4).tolist() for k in rewards}
    won = pairs = 0
    for k in rewards:
        r, c = np.array(rewards[k]), np.array(correct[k])
        if 0 < c.sum() < len(c):
            won += mannwhitneyu(r[c], r[~c]).statistic; pairs += c.sum() * (~c).sum()
    res = reward_accuracy(rewards, correct)
    assert res['pairs'] == pairs and res['accuracy'] == pytest.approx(won / pairs)

def test_reward_accuracy_errors():
    with pytest.raises(ValueError, match="prompt 'p' has correctness labels but no rewards"): reward_accuracy({}, {'p': [True]})
    with pytest.raises(ValueError, match="prompt 'p': 3 rewards but 2 correctness labels"): reward_accuracy({'p': [1, 2, 3]}, {'p': [True, False]})
    with pytest.raises(ValueError, match="prompt 'p': a reward is NaN"): reward_accuracy({'p': [1, float('nan')]}, {'p': [True, False]})

PROMPTS = [
    {'id': 'gsm8k-a', 'task': 'gsm8k', 'answer': '1,200', 'choices': []},
    {'id': 'arc-b', 'task': 'arc_challenge', 'answer': '3', 'choices': [{'label': l, 'text': t} for l, t in zip(DIGITS, 'wxyz')]},
    {'id': 'siqa-c', 'task': 'siqa', 'answer': 'C', 'choices': [{'label': l, 'text': t} for l, t in zip('ABC', 'xyz')]},
    {'id': 'oasst1-d', 'task': 'oasst1', 'answer': None, 'choices': []},
]
SAMPLES = [
    {'prompt_id': 'gsm8k-a', 'responses': ['#### 1200', 'So the answer is $1,200.00.', 'It is 120.'], 'response_token_ids': [[1], [2], [3]]},
    {'prompt_id': 'arc-b', 'responses': ['Answer: 3', 'Answer: C', 'I pick (3)']},
    {'prompt_id': 'siqa-c', 'responses': ['A ball.', 'answer is c']},
    {'prompt_id': 'oasst1-d', 'responses': ['Sure!']},
]

def test_correctness():
    assert correctness(SAMPLES, PROMPTS) == {'gsm8k-a': [True, True, False], 'arc-b': [True, False, True], 'siqa-c': [False, True]}

def test_correctness_from_a_dataset():
    from datasets import Dataset
    assert correctness(SAMPLES, Dataset.from_list(PROMPTS))['arc-b'] == [True, False, True]

def test_correctness_errors():
    with pytest.raises(ValueError, match="sample 0 has prompt_id 'zzz', which is not among the prompt records"):
        correctness([{'prompt_id': 'zzz', 'responses': ['A']}], PROMPTS)
    bad = [dict(PROMPTS[2], answer='D')]
    with pytest.raises(ValueError, match="prompt 'siqa-c': gold answer 'D' is not one of its option labels"):
        correctness(SAMPLES[2:3], bad)
    with pytest.raises(ValueError, match=r"prompt 'arc-b'.*task 'trivia' has no answer format"):
        correctness(SAMPLES[1:2], [dict(PROMPTS[1], task='trivia')])
    with pytest.raises(ValueError, match=r"sample 0 \(prompt 'siqa-c'\) needs 'responses'"):
        correctness([{'prompt_id': 'siqa-c'}], PROMPTS)

def test_iteration_reward_accuracy(tmp_path):
    write_jsonl(PROMPTS, tmp_path/'prompts.jsonl'); write_jsonl(SAMPLES, tmp_path/'samples.jsonl')
    write_jsonl([{'prompt_id': 'gsm8k-a', 'current': [1.0, 0.0, 0.5], 'previous': [0.0, 0.0, 1.0]},
                 {'prompt_id': 'arc-b', 'current': [2.0, 1.0, 0.0], 'previous': [0.0, 0.0, 0.0]},
                 {'prompt_id': 'siqa-c', 'current': [0.0, 1.0], 'previous': [1.0, 0.0]},
                 {'prompt_id': 'oasst1-d', 'current': [3.0], 'previous': [3.0]}], tmp_path/'rewards.jsonl')
    res = iteration_reward_accuracy(tmp_path)
    # current: gsm8k 1>0.5, 0<0.5 -> 1; arc 2>1, 0<1 -> 1; siqa 1>0 -> 1 => 3 of 5
    assert res['current']['accuracy'] == pytest.approx(3 / 5) and res['current']['pairs'] == 5
    # previous: gsm8k 0<1, 0<1 -> 0; arc ties -> 1; siqa 0<1 -> 0 => 1 of 5
    assert res['previous']['accuracy'] == pytest.approx(1 / 5) and res['previous']['prompts'] == 3
