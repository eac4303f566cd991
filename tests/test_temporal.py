"""Temporal (anchored rejection) on the tiny model for two iterations: iteration 1 is the judge's best against worst; in
iteration 2 every rejected response is one of M1's samples (sampled again here), scored by M2 below the chosen, with
M2's log-prob as its reference."""
import pytest

from cream_nb.core.config import apply_overrides, preset
from cream_nb.core.artifacts import read_json, read_jsonl, load_dataset_dir
from cream_nb.stages.preferences import best_worst
from cream_nb.methods import temporal as TM
from test_loop import _copy_sft


def test_temporal_rejects_the_anchors_worst_sample(tiny_run, tmp_path):
    from cream_nb.runs.run import CreamRun
    from cream_nb.models.engine import GenParams
    from cream_nb.models.logprobs import sequence_logps
    d = tmp_path/'temporal'
    _copy_sft(tiny_run[0], d)
    cfg = apply_overrides(preset('tiny'), ['loop.method="temporal"', 'reward.judge_scoring="expected"'])
    run = CreamRun(cfg, d, progress=False)
    s = run.run()
    for it in s['iterations']:
        t = it['iteration']; i = d/f'iter{t}'
        own, ds = read_json(i/'anchored_pairs.json'), load_dataset_dir(i/'pairs')
        rewards = {r['prompt_id']: r['current'] for r in read_jsonl(i/'rewards.jsonl')}
        samples = {x['prompt_id']: x['responses'] for x in read_jsonl(i/'samples.jsonl')}
        pairs, per = own['pairs'], own['report']['per_prompt']
        assert it['dpo']['steps'] >= 1 and len(ds) == len(pairs) == it['pairs']['pairs'] >= 1 and set(ds['kind']) == {'anchored'}
        for p in pairs:
            pid, a = p['prompt_id'], per[p['prompt_id']]
            ci, ri, why = TM.anchored_pair(rewards[pid], a['anchor_scores'], samples[pid], a['anchor_responses'])
            assert why is None and p['chosen'] == samples[pid][ci] and p['rejected'] == a['anchor_responses'][ri]
            assert p['chosen_reward'] == rewards[pid][ci] > p['rejected_reward'] == a['anchor_scores'][ri]
        if t == 1:   # the anchor is M1 = M_t: the judge's best against worst, both sampled indices
            assert own['report']['anchor_judge'] is None
            for p in pairs: assert (p['chosen_index'], p['rejected_index']) == best_worst(rewards[p['prompt_id']])[:2]
            continue
        assert all(p['rejected_index'] is None for p in pairs)
        prompts = read_jsonl(i/'prompts.jsonl')
        again = run.engine.generate('m1', prompts, GenParams.sampling(cfg.sampling))   # M1's samples, drawn again with the same seed
        assert {x['prompt_id']: x['responses'] for x in again} == {pid: v['anchor_responses'] for pid, v in per.items()}
        assert any(v['anchor_responses'] != samples[pid] for pid, v in per.items())   # not M2's own samples
        with run.model('m2') as m:
            lp = sequence_logps(m, run.tokenizer, [p['prompt'] for p in pairs], [p['rejected'] for p in pairs], batch_size=1)[0].tolist()
        assert [p['ref_rejected_logps'] for p in pairs] == pytest.approx(lp, abs=1e-4)
        m2 = {r['prompt_id']: r['logps'] for r in read_jsonl(i/'logps_m2.jsonl')}
        assert [p['ref_chosen_logps'] for p in pairs] == [m2[p['prompt_id']][p['chosen_index']] for p in pairs]
