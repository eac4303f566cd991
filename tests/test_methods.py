"""cream_nb.methods.registry: the registry, each method's checkpoints, rewards and rate on hand-made log-probs, DICE's
length control against a hand computation and a brute-force reference, and the tiny loop end to end per method."""
import json, subprocess
from types import SimpleNamespace as NS

import numpy as np
import pytest

from cream_nb.methods import registry as M
from cream_nb.core.config import ConfigError, preset, apply_overrides
from cream_nb.core.artifacts import read_json, read_jsonl, load_dataset_dir
from cream_nb.stages.preferences import best_worst, preference_pairs
from cream_nb.methods import length as length_

from conftest import CREAM
from test_loop import _copy_sft

BUILTIN = ('cream', 'srlm', 'dpo', 'oracle', 'cream-lc', 'scpo', 'meta-rewarding', 'temporal')


# ---- the registry ------------------------------------------------------------------------------
def test_registry_names_and_unknown_name():
    assert M.method_names() == BUILTIN
    assert [M.get_method(n).name for n in BUILTIN] == list(BUILTIN)
    with pytest.raises(ConfigError, match=r"unknown method 'ppo': known methods are 'cream', 'srlm', 'dpo', 'oracle', 'cream-lc', 'scpo', 'meta-rewarding', 'temporal'"):
        M.get_method('ppo')
    with pytest.raises(ValueError, match="already registered"): M.register_method(M.get_method('dpo'))
    with pytest.raises(TypeError, match="takes a Method"): M.register_method('dpo')
    # a run refuses an unknown method with the registered ones (config itself holds plain values)
    with pytest.raises(ConfigError, match=r"unknown method 'ppo': known methods are 'cream', 'srlm', 'dpo', 'oracle', 'cream-lc', 'scpo', 'meta-rewarding', 'temporal'"):
        M.method_for(apply_overrides(preset('tiny'), ['loop.method="ppo"']))


def test_a_registered_method_is_accepted_everywhere():
    "A new method touches one place: once registered, the config, METHODS and the CLI take it."
    from cream_nb.cli import build_parser, resolve_config
    m = M.Method('judge-free', 'test only', M.current_model, M.oracle_scores, M.plain_dpo_rate, M.oracle_names)
    M.register_method(m)
    try:
        assert 'judge-free' in M.method_names()
        assert apply_overrides(preset('tiny'), ['loop.method="judge-free"']).loop.method == 'judge-free'
        a = build_parser().parse_args(['run', '--preset', 'tiny', '--run-dir', 'x', '--method', 'judge-free'])
        assert M.method_for(resolve_config(a)) is m
    finally: del M._REGISTRY['judge-free']
    assert 'judge-free' not in M.method_names()


@pytest.mark.parametrize('name', BUILTIN)
def test_cli_accepts_each_registered_method(name):
    from cream_nb.cli import build_parser, resolve_config
    cfg = resolve_config(build_parser().parse_args(['run', '--preset', 'tiny', '--run-dir', 'x', '--method', name]))
    assert cfg.loop.method == name and M.method_for(cfg).name == name


# ---- checkpoints, rates, labels ------------------------------------------------------------------
def test_models_rates_and_labels_per_method():
    models = {n: [M.get_method(n).models(t) for t in (1, 2, 3)] for n in BUILTIN}
    implicit = [['m1', 'm0'], ['m2', 'm1', 'm0'], ['m3', 'm2', 'm1']]
    assert models == {'cream': implicit, 'dpo': implicit, 'cream-lc': implicit,
                      'srlm': [['m1'], ['m2'], ['m3']], 'oracle': [['m1'], ['m2'], ['m3']], 'scpo': [['m1'], ['m2'], ['m3']],
                      'meta-rewarding': [['m1'], ['m2'], ['m3']], 'temporal': [['m1'], ['m2'], ['m3']]}
    tiny = preset('tiny')
    assert {n: M.get_method(n).rate(tiny) for n in BUILTIN} == {'cream': 'avg', 'cream-lc': 'avg', 'dpo': 1.0, 'srlm': 1.0, 'oracle': 1.0, 'scpo': 1.0,
                                                            'meta-rewarding': 1.0, 'temporal': 1.0}
    dyn, fixed = (apply_overrides(tiny, [o]) for o in ('consistency.mode="dyn"', 'consistency.fixed=0.25'))
    assert (M.get_method('cream').rate(dyn), M.get_method('cream').rate(fixed), M.get_method('dpo').rate(fixed)) == ('dyn', 0.25, 1.0)
    assert M.get_method('cream').reward_names(1) == ('M1 reward', 'M0 normalised likelihood')
    assert M.get_method('dpo').reward_names(3) == ('M3 reward', 'M2 reward')
    assert M.get_method('srlm').reward_names(2) == ('M2 judge score', None)
    assert M.get_method('oracle').reward_names(2) == ('oracle (gold answer)', None)
    assert M.get_method('cream-lc').reward_names(2) == ('M2 reward - alpha*length', 'M1 reward - alpha*length')


# ---- rewards on hand-made log-probs --------------------------------------------------------------
LOGPS = {'m2': {'q': {'logps': [-9.0, -13.0, -8.5], 'n_tokens': [5, 4, 2]}},
         'm1': {'q': {'logps': [-10.0, -12.0, -8.0], 'n_tokens': [5, 4, 2]}},
         'm0': {'q': {'logps': [-11.0, -11.0, -11.0], 'n_tokens': [5, 4, 2]}}}


@pytest.mark.parametrize('name', ['cream', 'dpo'])
def test_implicit_rewards_by_hand(name):
    m = M.get_method(name)
    (r1,) = m.rewards(M.ScoreContext(t=1, cfg=None, prompts=[], samples=[], logps={k: LOGPS[k] for k in m.models(1)}))
    assert r1['prompt_id'] == 'q'
    assert r1['current'] == pytest.approx([1.0, -1.0, 3.0])                  # log pi_1 - log pi_0
    assert r1['previous'] == pytest.approx([-11 / 5, -11 / 4, -11 / 2])       # M0: log pi_0 / |y|
    (r2,) = m.rewards(M.ScoreContext(t=2, cfg=None, prompts=[], samples=[], logps=LOGPS))
    assert r2['current'] == pytest.approx([1.0, -1.0, -0.5]) and r2['previous'] == pytest.approx([1.0, -1.0, 3.0])


def test_oracle_rewards_by_hand():
    prompts = [{'id': 'q', 'task': 'arc_easy', 'messages': [{'role': 'user', 'content': 'Which? A. x B. y'}],
                'choices': [{'label': 'A', 'text': 'x'}, {'label': 'B', 'text': 'y'}], 'answer': 'B'},
               {'id': 'open', 'task': 'oasst1', 'messages': [{'role': 'user', 'content': 'Hi'}], 'choices': [], 'answer': None}]
    samples = [{'prompt_id': 'q', 'responses': ['Answer: B', 'Answer: A', 'hmm'], 'response_token_ids': [[1]] * 3},
               {'prompt_id': 'open', 'responses': ['hello', 'hey', 'yo'], 'response_token_ids': [[1]] * 3}]
    rows = M.get_method('oracle').rewards(M.ScoreContext(t=1, cfg=None, prompts=prompts, samples=samples))
    assert rows == [{'prompt_id': 'q', 'current': [1.0, 0.0, 0.0], 'previous': None},
                    {'prompt_id': 'open', 'current': [None, None, None], 'previous': None}]


def test_srlm_asks_m_t_to_judge_and_keeps_the_judgements(monkeypatch):
    import contextlib
    from cream_nb.stages import judge as R
    used = []
    @contextlib.contextmanager
    def model(name): used.append(name); yield f'model {name}'
    def fake_judge(m, tok, prompts, samples, cfg, progress=True, engine=None, checkpoint=None):
        assert m == 'model m2' and tok == 'tok' and engine == 'the run engine' and checkpoint == 'm2'
        return {'q': [4.0, None, 1.0]}, {'n': 3, 'parsed': 2}
    monkeypatch.setattr(R, 'judge_rewards', fake_judge)
    ctx = M.ScoreContext(t=2, cfg=preset('tiny'), prompts=[], samples=[{'prompt_id': 'q', 'responses': ['a', 'b', 'c']}],
                         model=model, tokenizer='tok', engine='the run engine')
    assert M.get_method('srlm').rewards(ctx) == [{'prompt_id': 'q', 'current': [4.0, None, 1.0], 'previous': None}]
    assert used == ['m2'] and ctx.artifacts == {'judge_stats.json': {'n': 3, 'parsed': 2}}
    assert M.get_method('srlm').artifacts == ('judge_stats.json',)


# ---- DICE ---------------------------------------------------------------------------------------
HAND_R = {'p1': [3.0, 1.0, 0.0], 'p2': [2.0, 0.5, 1.0]}
HAND_L = {'p1': [10, 4, 2], 'p2': [8, 2, 6]}


def test_dice_alpha_by_hand():
    # breakpoints 1/8, 1/4, 1/3, 3/8, 1/2; gaps at 0, 3/16, 7/24, 17/48: 9-2=7, 9-4=5, 6-4=2, 3-4=-1 -> alpha = 17/48
    fit = length_.dice_alpha(HAND_R, HAND_L)
    assert fit['alpha'] == pytest.approx(17 / 48) and fit['candidates'] == 6
    assert fit['before'] == {'chosen_tokens': 9.0, 'rejected_tokens': 2.0, 'pairs': 2}
    assert fit['after'] == {'chosen_tokens': 3.0, 'rejected_tokens': 4.0, 'pairs': 2}
    # the alpha just before the crossing wins when it is closer to balanced: gaps 1 (alpha 0) and -2 (next)
    assert length_.dice_alpha({'p1': [3.0, 1.0, 0.0], 'p2': [1.0, 2.0, None]}, HAND_L)['alpha'] == 0.0
    assert length_.dice_alpha({'p': [1.0, 0.0]}, {'p': [2, 5]})['alpha'] == 0.0      # chosen already shorter
    assert length_.dice_alpha({'p': [0.0, 1.0, None]}, {'p': [3, 3, 9]})['alpha'] == 0.0


def test_dice_correct_by_hand():
    samples = [{'prompt_id': p, 'responses': ['x'] * 3, 'response_token_ids': [[0] * n for n in HAND_L[p]]} for p in HAND_L]
    rows = [{'prompt_id': p, 'current': r, 'previous': None} for p, r in HAND_R.items()]
    out, rep = length_.dice_correct(rows, samples)
    a = 17 / 48
    assert out[0]['current'] == pytest.approx([3 - 10 * a, 1 - 4 * a, 0 - 2 * a])
    assert out[1]['current'] == pytest.approx([2 - 8 * a, 0.5 - 2 * a, 1 - 6 * a])
    assert out[0]['previous'] is None and 'previous' not in rep and rows[0]['current'] == [3.0, 1.0, 0.0]   # input untouched
    # the pairs made from the corrected rewards have the lengths the report says
    prompts = [{'id': p, 'messages': [{'role': 'user', 'content': p}]} for p in HAND_L]
    samples_t = [{**s, 'responses': [f'{s["prompt_id"]} {j}' for j in range(3)]} for s in samples]
    _, stats = preference_pairs(prompts, samples_t, {r['prompt_id']: r['current'] for r in out})
    assert (stats['mean_chosen_tokens'], stats['mean_rejected_tokens']) == (3.0, 4.0)


def _naive_gap(rewards, lengths, alpha):
    "Mean chosen minus mean rejected length of the pairs best_worst makes from r - alpha*|y| (the definition)."
    c, r = [], []
    for pid, rw in rewards.items():
        i, j, why = best_worst([None if x is None else x - alpha * l for x, l in zip(rw, lengths[pid])])
        if why is None: c.append(lengths[pid][i]); r.append(lengths[pid][j])
    return np.mean(c) - np.mean(r) if c else np.nan


def test_dice_alpha_against_the_definition_on_random_rewards():
    rng = np.random.default_rng(0)
    for trial in range(30):
        P, N = int(rng.integers(3, 12)), int(rng.integers(2, 6))
        lengths = {f'p{i}': rng.integers(1, 40, N).tolist() for i in range(P)}
        # rewards that grow with length (the bias DICE corrects), some unscored
        rewards = {p: [None if rng.random() < 0.1 else float(0.3 * l + rng.normal(0, 2)) for l in L] for p, L in lengths.items()}
        fit = length_.dice_alpha(rewards, lengths)
        a = fit['alpha']
        after = fit['after']
        if after['pairs']:
            assert after['chosen_tokens'] - after['rejected_tokens'] == pytest.approx(_naive_gap(rewards, lengths, a))
        assert fit['before']['pairs'] == 0 or fit['before']['chosen_tokens'] - fit['before']['rejected_tokens'] == pytest.approx(_naive_gap(rewards, lengths, 0.0))
        # no smaller alpha closes the gap: the gap stays > 0 on a fine grid below the chosen one
        for b in np.linspace(0, a, 200, endpoint=False)[1:]:
            g = _naive_gap(rewards, lengths, b)
            assert np.isnan(g) or g > 0 or abs(g) >= abs(_naive_gap(rewards, lengths, a)) - 1e-9, (trial, a, b, g)


def test_length_control_option_and_variant():
    cfg = lambda method, lc='off': apply_overrides(preset('tiny'), [f'loop.method="{method}"', f'reward.length_control="{lc}"'])
    assert M.method_for(cfg('cream')) is M.get_method('cream')
    assert M.method_for(cfg('cream-lc')).length_control == 'dice'                 # the variant applies DICE whatever the option says
    assert [M.method_for(cfg(m, 'dice')).length_control for m in ('cream', 'dpo')] == ['dice', 'dice']
    with pytest.raises(ConfigError, match="reward.length_control = 'lengthy' is invalid: allowed one of 'off', 'dice'"):
        M.method_for(cfg('cream', 'lengthy'))                                   # checked when a run starts
    for m in ('srlm', 'oracle'):
        with pytest.raises(ConfigError, match=f"method '{m}' does not use: use it with cream, dpo, cream-lc"):
            M.method_for(cfg(m, 'dice'))


def test_cli_refuses_length_control_for_a_judge(tmp_path):
    r = subprocess.run(CREAM + ['run', '--preset', 'tiny', '--run-dir', str(tmp_path/'x'), '--method', 'srlm',
                                '--set', 'reward.length_control="dice"', '--quiet'], capture_output=True, text=True)
    assert r.returncode == 2 and "method 'srlm' does not use" in r.stderr and not (tmp_path/'x'/'iter1').exists()


def test_old_runs_keep_their_fingerprints(tiny_run):
    "A run made before reward.length_control existed resumes: at 'off' the field is in no stage marker."
    from cream_nb.runs.stage import _section
    d, _ = tiny_run
    for marker in d.rglob('_stage_*.json'):
        assert 'length_control' not in marker.read_text(), marker
    assert 'length_control' in _section(apply_overrides(preset('tiny'), ['reward.length_control="dice"']), 'reward')['reward']


# ---- the tiny loop, one iteration per method ------------------------------------------------------
CASES = {'cream-dyn': ['consistency.mode="dyn"', 'consistency.method="spearman"'], 'dpo': ['loop.method="dpo"'],
         'srlm': ['loop.method="srlm"'], 'oracle': ['loop.method="oracle"'], 'cream-lc': ['loop.method="cream-lc"'],
         'dpo+dice': ['loop.method="dpo"', 'reward.length_control="dice"']}


@pytest.mark.parametrize('case', list(CASES))
def test_each_method_runs_one_iteration(tiny_run, tmp_path, case):
    from cream_nb.runs.run import CreamRun
    from cream_nb.runs.summary import STAGES
    d_full, _ = tiny_run
    d = tmp_path/case
    _copy_sft(d_full, d)
    cfg = apply_overrides(preset('tiny'), ['loop.iterations=1'] + CASES[case])
    run = CreamRun(cfg, d, progress=False)
    s = run.run()
    events = {(e['stage'], e['event']) for e in run.log.events()}
    assert ('sft', 'skip') in events and ('sft', 'start') not in events
    it = s['iterations'][0]
    assert it['done'] == list(STAGES)
    if it['pairs']['pairs']: assert it['dpo']['steps'] >= 1
    else:  # the random tiny model may answer nothing right: no oracle pairs, and M2 is M1 unchanged
        assert case in ('oracle', 'srlm') and it['dpo']['steps'] == 0 and 'copy of m1' in it['dpo']['skipped']
    it_dir = d/'iter1'
    cons, rw, samples = read_json(it_dir/'consistency.json'), read_jsonl(it_dir/'rewards.jsonl'), read_jsonl(it_dir/'samples.jsonl')
    assert cons['training'] == ('dyn' if case == 'cream-dyn' else 'avg' if case == 'cream-lc' else 1.0)
    if case == 'cream-dyn': assert cons['method'] == 'spearman' and len(cons['per_prompt']) == 8
    logps = sorted(p.name for p in it_dir.glob('logps_*.jsonl'))
    assert logps == (['logps_m1.jsonl'] if case in ('srlm', 'oracle') else ['logps_m0.jsonl', 'logps_m1.jsonl'])
    if case == 'oracle':   # 1 for a correct answer, 0 otherwise, None without a gold answer
        assert all(v in (0.0, 1.0) for r in rw if r['current'] and r['current'][0] is not None for v in r['current'])
    if case == 'srlm': assert read_json(it_dir/'judge_stats.json')['n'] == 8 * 4
    # every method records the mean token length of chosen and rejected responses, as the pairs and samples say
    pairs, lens = load_dataset_dir(it_dir/'pairs'), {x['prompt_id']: [len(t) for t in x['response_token_ids']] for x in samples}
    if len(pairs):
        assert it['pairs']['mean_chosen_tokens'] == pytest.approx(np.mean([lens[p][i] for p, i in zip(pairs['prompt_id'], pairs['chosen_index'])]))
        assert it['pairs']['mean_rejected_tokens'] == pytest.approx(np.mean([lens[p][i] for p, i in zip(pairs['prompt_id'], pairs['rejected_index'])]))
    # the inspectors label the rewards as the method (and its length control) names them
    from cream_nb.reporting.prompts import prompt_view
    assert prompt_view(d, 1, rw[0]['prompt_id'])['reward_names'] == M.method_for(cfg).reward_names(1)
    lc = it_dir/'length_control.json'
    assert lc.exists() == (case in ('cream-lc', 'dpo+dice'))
    if lc.exists():   # rewards.jsonl holds r - alpha*|y|, r recomputed here from the stored log-probs
        rep = read_json(lc)
        lp1, lp0 = ({r['prompt_id']: r for r in read_jsonl(it_dir/f'logps_{m}.jsonl')} for m in ('m1', 'm0'))
        for row in rw:
            p, L = row['prompt_id'], lens[row['prompt_id']]
            raw = [a - b for a, b in zip(lp1[p]['logps'], lp0[p]['logps'])]
            prev = [a / n for a, n in zip(lp0[p]['logps'], lp0[p]['n_tokens'])]
            assert row['current'] == pytest.approx([r - rep['current']['alpha'] * l for r, l in zip(raw, L)])
            assert row['previous'] == pytest.approx([r - rep['previous']['alpha'] * l for r, l in zip(prev, L)])
        assert rep['current']['alpha'] >= 0 and rep['current']['after']['pairs'] == it['pairs']['pairs']
        assert rep['current']['after']['chosen_tokens'] == pytest.approx(it['pairs']['mean_chosen_tokens'])


# ---- the SRLM judge on the tiny model: expected scores train, an unparseable judge is named -----------------
def test_srlm_with_expected_scores_trains_on_pairs_in_every_iteration(tiny_run, tmp_path):
    "The random tiny model writes no 'Score: k', but its expected score ranks the responses: pairs in both iterations."
    from cream_nb.runs.run import CreamRun
    d = tmp_path/'srlm-expected'
    _copy_sft(tiny_run[0], d)
    cfg = apply_overrides(preset('tiny'), ['loop.method="srlm"', 'reward.judge_scoring="expected"'])
    s = CreamRun(cfg, d, progress=False).run()
    assert [it['iteration'] for it in s['iterations']] == [1, 2]
    for it in s['iterations']:
        assert it['pairs']['pairs'] > 0 and it['dpo']['steps'] >= 1, it
        assert (it['judge']['scoring'], it['judge']['parsed'], it['judge']['n'], it['judge']['parse_rate']) == ('expected', 32, 32, 1.0)
        assert 0 < it['judge']['digit_mass_min'] <= it['judge']['digit_mass_mean'] <= 1
        rw = read_jsonl(d/f"iter{it['iteration']}"/'rewards.jsonl')
        assert all(0 <= x <= 5 for r in rw for x in r['current']) and all(r['previous'] is None for r in rw)
    assert 'judgements' not in s['iterations'][0]['judge']


def test_srlm_advice_names_the_judge_when_nothing_parses(tiny_run, tmp_path):
    "With the paper's generating judge the tiny model parses nothing: the summary shows parse rate 0 and the advice names the judge."
    from cream_nb.runs.run import CreamRun
    d = tmp_path/'srlm-generate'
    _copy_sft(tiny_run[0], d)
    cfg = apply_overrides(preset('tiny'), ['loop.method="srlm"', 'loop.iterations=1'])
    it = CreamRun(cfg, d, progress=False).run()['iterations'][0]
    assert (it['judge']['scoring'], it['judge']['parsed'], it['judge']['n'], it['judge']['parse_rate']) == ('generate', 0, 32, 0.0)
    assert it['pairs']['pairs'] == 0 and it['dpo']['steps'] == 0
    assert 'judge wrote no parsable score in any of its 32 judgements' in it['dpo']['skipped']
    assert "reward.judge_scoring='expected'" in it['dpo']['skipped'] and 'more prompts' not in it['dpo']['skipped']


# ---- ScPO on the tiny loop: responses with known votes, pairs weighted by the vote margin ----------------
VOTES = ['AAAB', 'ABBC', 'CCDD', 'DDDD', 'AA-B']   # per prompt (cycled): the answer letter of each of the 4 responses
EXPECT = {'AAAB': (0, 3, 0.5), 'ABBC': (1, 0, 0.25), 'CCDD': 'tied_votes', 'DDDD': 'unanimous', 'AA-B': (0, 3, 0.25)}


def test_scpo_trains_on_vote_pairs_weighted_by_the_margin(tiny_run, tmp_path, monkeypatch):
    "The engine's samples are replaced by responses whose votes are known; pairs, weights, skips and training follow them."
    from cream_nb.runs.run import CreamRun, Iteration
    from cream_nb.data.answers import EXTRACT_TASKS
    d_full, _ = tiny_run
    d = tmp_path/'scpo'
    _copy_sft(d_full, d)
    cfg = apply_overrides(preset('tiny'), ['loop.iterations=1', 'loop.method="scpo"'])
    run, real, seen = CreamRun(cfg, d, progress=False), Iteration.sample, {}
    def sample(self):
        def generate(name, prompts, params, progress=False, resume_path=None):
            out = []
            for i, p in enumerate(prompts):
                labels, pat = [c['label'] for c in p['choices']] or ['11', '12', '13', '14'], VOTES[i % len(VOTES)]
                resp = ["I am not sure." if c == '-' else f"The answer is {labels['ABCD'.index(c) % len(labels)]}." for c in pat]
                seen[p['id']] = pat if p['task'] in EXTRACT_TASKS else 'open'
                out.append({'prompt_id': p['id'], 'responses': resp,
                            'response_token_ids': [self.run.tokenizer(r, add_special_tokens=False)['input_ids'] for r in resp]})
            return out
        self.run.engine.generate = generate   # for this stage only: evaluation generates with the real engine
        try: return real(self)
        finally: del self.run.engine.generate
    monkeypatch.setattr(Iteration, 'sample', sample)
    s = run.run()
    it, it_dir = s['iterations'][0], d/'iter1'
    want = {pid: EXPECT[pat] if pat != 'open' else 'unextractable' for pid, pat in seen.items()}
    # 3-choice questions (siqa) turn D into A: DDDD stays unanimous, CCDD tied
    pairs = load_dataset_dir(it_dir/'pairs')
    got = {p: (c, r, w) for p, c, r, w in zip(pairs['prompt_id'], pairs['chosen_index'], pairs['rejected_index'], pairs['weight'])}
    assert got == {p: w for p, w in want.items() if isinstance(w, tuple)}
    skipped = {k[8:]: v for k, v in it['pairs'].items() if k.startswith('skipped_') and v}
    assert skipped == {r: sum(w == r for w in want.values()) for r in set(want.values()) if isinstance(r, str)}
    votes = read_json(it_dir/'votes.json')
    assert votes['prompts'] == len(seen) and votes['skipped'] == skipped
    assert it['dpo']['pairs'] == len(got) >= 1 and it['dpo']['steps'] >= 1
    assert sorted(p.name for p in it_dir.glob('logps_*.jsonl')) == ['logps_m1.jsonl']   # only M_t: the DPO reference


# ---- reward agreement on the tiny loop: what survives is what the second reward orders the same way ----------
@pytest.mark.parametrize('case', ['dpo+previous', 'srlm+implicit'])
def test_agreement_keeps_only_pairs_the_second_reward_orders_the_same_way(tiny_run, tmp_path, case):
    from cream_nb.runs.run import CreamRun
    d_full, _ = tiny_run
    d = tmp_path/case
    _copy_sft(d_full, d)
    method, mode = case.split('+')
    extra = ['reward.judge_scoring="expected"'] if method == 'srlm' else []
    cfg = apply_overrides(preset('tiny'), ['loop.iterations=1', f'loop.method="{method}"', f'reward.agreement="{mode}"'] + extra)
    s = CreamRun(cfg, d, progress=False).run()
    it, it_dir = s['iterations'][0], d/'iter1'
    rep, stats = read_json(it_dir/'agreement.json'), it['pairs']
    assert rep['mode'] == mode and rep['pairs_before'] == rep['kept'] + rep['disagreement'] + rep['no_second_reward'] >= 1
    assert stats['pairs'] == rep['kept'] and stats.get('skipped_disagreement', 0) == rep['disagreement']
    rows = {r['prompt_id']: r for r in read_jsonl(it_dir/'rewards.jsonl')}
    if mode == 'previous': second = {p: r['previous'] for p, r in rows.items()}
    else:   # M1's implicit reward, from the log-probs the run scored for it
        lp = {m: {r['prompt_id']: r['logps'] for r in read_jsonl(it_dir/f'logps_{m}.jsonl')} for m in ('m1', 'm0')}
        second = {p: [a - b for a, b in zip(lp['m1'][p], lp['m0'][p])] for p in rows}
    pairs = load_dataset_dir(it_dir/'pairs')
    for p, c, r in zip(pairs['prompt_id'], pairs['chosen_index'], pairs['rejected_index']):
        assert second[p][c] > second[p][r]
    for p, row in rows.items():   # every dropped pair is one the second reward orders otherwise
        if row.get('skip') == 'disagreement':
            c, r, _ = best_worst(row['current'], p)
            assert not second[p][c] > second[p][r]
    assert sum(row.get('skip') == 'disagreement' for row in rows.values()) == rep['disagreement']


def test_run_machinery_compare_cli_and_inspectors_never_name_the_new_methods():
    "The methods added after the registry (ScPO, the agreement option, Meta-Rewarding, Temporal) live in cream_nb.methods only: nothing else names them."
    import ast, re
    from pathlib import Path
    pkg = Path(M.__file__).parents[1]
    for f in [*sorted((pkg/'runs').glob('*.py')), *sorted((pkg/'reporting').glob('*.py')), *sorted((pkg/'stages').glob('*.py')), pkg/'cli.py']:
        tree = ast.parse(f.read_text())
        docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}   # docstrings may cite
        words = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]
        words += [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)] + [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)]
        hits = [w for w in words if re.search(r"\bscpo\b|ScPO|vote_rewards|vote_margin|dpo-agree|with_agreement|agreement_filter|[Mm]eta.[Rr]ewarding|meta_judge|\btemporal\b|anchored", w)]
        assert not hits, f"{f.relative_to(pkg.parent)} names a method of its own: {hits}"
