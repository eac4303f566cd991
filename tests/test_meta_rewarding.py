"""Meta-Rewarding on the tiny model end to end: actor pairs recomputed from the stored scores and lengths, the meta-judge's
battles and the judge pairs' reference log-probs recomputed under M_t, both kinds trained on; too-long judge pairs left out."""
import pytest

from cream_nb.core.config import apply_overrides, preset
from cream_nb.core.artifacts import read_json, read_jsonl, load_dataset_dir
from cream_nb.methods import meta as MR
from test_loop import _copy_sft

EXPECTED = 'reward.judge_scoring="expected"'   # the random tiny model writes no parsable 'Score: k'


def test_meta_rewarding_trains_on_actor_and_judge_pairs_it_can_account_for(tiny_run, tmp_path):
    from cream_nb.runs.run import CreamRun
    from cream_nb.models.logprobs import sequence_logps
    from cream_nb.stages.judge import choice_probs
    d = tmp_path/'meta'
    _copy_sft(tiny_run[0], d)
    cfg = apply_overrides(preset('tiny'), ['loop.method="meta-rewarding"', EXPECTED, 'dpo.max_length=1024'])
    run = CreamRun(cfg, d, progress=False)
    s = run.run()
    for it in s['iterations']:
        t = it['iteration']; i = d/f'iter{t}'
        own, ds, stats = read_json(i/'meta_judge.json'), load_dataset_dir(i/'pairs'), read_json(i/'pairs_stats.json')
        rep, pairs = own['report'], own['pairs']
        assert own['replace'] is True and stats['pairs'] == len(ds) == len(pairs) and it['dpo']['steps'] >= 1
        assert list(ds['prompt_id']) == [p['prompt_id'] for p in pairs] and list(ds['kind']) == [p['kind'] for p in pairs]
        assert stats['extra_pairs'] == {'actor': rep['actor_pairs'], 'judge': rep['judge_pairs']} and rep['judge_pairs'] >= 1
        rewards = {r['prompt_id']: r for r in read_jsonl(i/'rewards.jsonl')}
        samples = {x['prompt_id']: x for x in read_jsonl(i/'samples.jsonl')}
        logps = {r['prompt_id']: r['logps'] for r in read_jsonl(i/f'logps_m{t}.jsonl')}
        actor = {p['prompt_id']: p for p in pairs if p['kind'] == 'actor'}
        for pid, r in rewards.items():   # the length-controlled pick, recomputed from the stored scores and token counts
            ci, ri, why = MR.length_controlled_pair(r['current'], [len(x) for x in samples[pid]['response_token_ids']], MR.RHO)
            if why: assert r['skip'] == why and pid not in actor; continue
            p = actor[pid]
            assert (p['chosen_index'], p['rejected_index']) == (ci, ri) and (p['chosen'], p['rejected']) == (samples[pid]['responses'][ci], samples[pid]['responses'][ri])
            assert (p['ref_chosen_logps'], p['ref_rejected_logps']) == (logps[pid][ci], logps[pid][ri])
            assert (p['chosen_reward'], p['rejected_reward']) == (r['current'][ci], r['current'][ri])
        judge = [p for p in pairs if p['kind'] == 'judge']
        prompts = {p['id']: p for p in read_jsonl(i/'prompts.jsonl')}
        with run.model(f'm{t}') as m:   # M_t as meta-judge: both orders of every battle, read again
            for pid, pp in rep['per_prompt'].items():
                q, resp = prompts[pid]['messages'][-1]['content'], samples[pid]['responses']
                texts = [MR.meta_judge_prompt(q, resp[k], *ab) for k, js in zip(pp['judged'], pp['judgements']) for ab in (js, js[::-1])]
                pr = choice_probs(m, run.tokenizer, texts, *MR.label_tokens(run.tokenizer), batch_size=3)
                assert pp['p_first_better'] == pytest.approx([MR.battle_probability(pr[2 * k], pr[2 * k + 1]) for k in range(len(pp['judged']))], abs=1e-5)
            lp = sequence_logps(m, run.tokenizer, [p['prompt'] for p in judge for _ in (0, 1)],
                                [x for p in judge for x in (p['chosen'], p['rejected'])], batch_size=1)[0].tolist()
        assert [x for p in judge for x in (p['ref_chosen_logps'], p['ref_rejected_logps'])] == pytest.approx(lp, abs=1e-4)
        for p in judge:   # the chosen judgement is the one the meta-judge prefers; both judge the same response of that prompt
            pid = p['prompt_id'].removesuffix('#judge'); pp = rep['per_prompt'][pid]
            k = pp['judged'].index(pp['judge_pair']); js, pf = pp['judgements'][k], pp['p_first_better'][k]
            assert p['chosen_reward'] == pytest.approx(max(pf, 1 - pf)) and {p['chosen'], p['rejected']} == set(js)
            assert p['chosen'] == (js[0] if pf > 0.5 else js[1]) and abs(pf - 0.5) == max(abs(x - 0.5) for x in pp['p_first_better'])
            assert p['chosen_index'] is None and resp_in(p['prompt'], samples[pid]['responses'][pp['judge_pair']])
        assert rep['judgements'] == 4 * rep['actor_pairs']


def resp_in(prompt, response): return f'<response>{response}</response>' in prompt[-1]['content']


def test_judge_pairs_longer_than_dpo_max_length_are_counted_and_left_out(tiny_run, tmp_path):
    from cream_nb.runs.run import CreamRun
    d = tmp_path/'short'
    _copy_sft(tiny_run[0], d)
    cfg = apply_overrides(preset('tiny'), ['loop.method="meta-rewarding"', EXPECTED, 'loop.iterations=1'])   # dpo.max_length=256
    it = CreamRun(cfg, d, progress=False).run()['iterations'][0]
    rep = read_json(d/'iter1'/'meta_judge.json')['report']
    assert rep['judge_pairs'] == 0 and rep['skipped']['judge_too_long'] == rep['actor_pairs'] >= 1
    assert it['pairs']['extra_pairs'] == {'actor': rep['actor_pairs']} and it['dpo']['steps'] >= 1
    assert all(v.get('skip') == 'too_long' for v in rep['per_prompt'].values())


def test_compare_runs_the_new_methods_beside_srlm_sharing_what_it_can(tmp_path, capsys):
    "`cream compare --preset tiny` with SRLM, Meta-Rewarding and Temporal: one SFT and one set of iteration-1 samples; in iteration 1 all three judge alike, and Temporal's pairs are SRLM's."
    from cream_nb.cli import main
    from cream_nb.reporting import tables as C
    from cream_nb.runs.stage import StageLog
    root = tmp_path/'cmp'
    assert main(['compare', '--preset', 'tiny', '--run-dir', str(root), '--methods', 'm1', 'srlm', 'meta-rewarding', 'temporal',
                 '--iterations', '1', '--set', EXPECTED, '--quiet']) == 0
    out = capsys.readouterr().out
    starts = {}
    for d in C.compare_dirs(root).values():
        for e in StageLog(d/'stages.jsonl').events():
            if e['event'] == 'start': starts[e['stage']] = starts.get(e['stage'], 0) + 1
    assert starts['sft'] == 1 and starts['iter1/sample'] == 1 and starts['iter1/train'] == 3
    assert read_json(root/'meta-rewarding'/'config.json')['dpo']['max_length'] == 768 and read_json(root/'temporal'/'config.json')['dpo']['max_length'] == 256
    rw = {m: {r['prompt_id']: r['current'] for r in read_jsonl(root/m/'iter1'/'rewards.jsonl')} for m in ('srlm', 'meta-rewarding', 'temporal')}
    assert rw['srlm'] == rw['meta-rewarding'] == rw['temporal']      # M1 judges the same samples the same way in all three
    pairs = {m: load_dataset_dir(root/m/'iter1'/'pairs') for m in ('srlm', 'temporal', 'meta-rewarding')}
    sr, tp = pairs['srlm'], pairs['temporal']   # iteration 1: the anchor is M1 itself, so the rejected (and the chosen, unless the future model's) are SRLM's
    assert list(zip(tp['prompt_id'], tp['rejected_index'])) == list(zip(sr['prompt_id'], sr['rejected_index']))
    assert all(k == 'future_chosen' or c == c0 for k, c, c0 in zip(tp['kind'], tp['chosen_index'], sr['chosen_index']))
    assert 'judge' in set(pairs['meta-rewarding']['kind'])           # dpo.max_length=768 leaves room for the judge pairs
    tab = read_json(root/'compare.json')
    assert tab['methods'] == ['m1', 'srlm', 'meta-rewarding', 'temporal'] and all(m in out for m in tab['methods'])
