"""Temporal self-rewarding on the tiny model for two iterations: every rejected response is one of M1's samples (drawn
again here), every chosen is M_t's best or the provisional M_{t+1}'s best where M_t's judge scores it higher, every
reference log-prob is M_t's, and nothing of the provisional model stays on disk or on the base model."""
import pytest

from cream_nb.core.config import apply_overrides, preset
from cream_nb.core.artifacts import read_json, read_jsonl, load_dataset_dir
from cream_nb.stages.preferences import best_worst
from cream_nb.methods import temporal as TM
from test_loop import _copy_sft


def test_temporal_anchors_the_rejected_and_lets_a_provisional_next_model_guide_the_chosen(tiny_run, tmp_path):
    from cream_nb.runs.run import CreamRun
    from cream_nb.models.engine import GenParams
    from cream_nb.models.logprobs import sequence_logps
    d = tmp_path/'temporal'
    _copy_sft(tiny_run[0], d)
    cfg = apply_overrides(preset('tiny'), ['loop.method="temporal"', 'reward.judge_scoring="expected"'])
    run = CreamRun(cfg, d, progress=False)
    s = run.run()
    replaced = 0
    for it in s['iterations']:
        t = it['iteration']; i = d/f'iter{t}'
        own, ds = read_json(i/'anchored_pairs.json'), load_dataset_dir(i/'pairs')
        rewards = {r['prompt_id']: r['current'] for r in read_jsonl(i/'rewards.jsonl')}
        samples = {x['prompt_id']: x['responses'] for x in read_jsonl(i/'samples.jsonl')}
        pairs, per, fut = own['pairs'], own['report']['per_prompt'], own['report']['future']
        assert it['dpo']['steps'] >= 1 and len(ds) == len(pairs) == it['pairs']['pairs'] >= 1 and list(ds['kind']) == [p['kind'] for p in pairs]
        assert fut == {'used': True, 'trained_on': len(pairs), 'chosen_replaced': sum(p['kind'] == 'future_chosen' for p in pairs)}
        for p in pairs:
            pid, a = p['prompt_id'], per[p['prompt_id']]
            ci, ri, why = TM.anchored_pair(rewards[pid], a['anchor_scores'], samples[pid], a['anchor_responses'])
            assert why is None and [ci, ri] == a['pair'] and p['rejected'] == a['anchor_responses'][ri] and p['rejected_reward'] == a['anchor_scores'][ri]
            k = TM.future_chosen(rewards[pid][ci], p['rejected'], a['future_responses'], a['future_scores'])
            assert k == a['future_chosen'] and len(a['future_responses']) == cfg.sampling.n_responses
            if k is None: assert (p['kind'], p['chosen'], p['chosen_index'], p['chosen_reward']) == ('anchored', samples[pid][ci], ci, rewards[pid][ci])
            else:
                replaced += 1
                assert (p['kind'], p['chosen'], p['chosen_index']) == ('future_chosen', a['future_responses'][k], None)
                assert p['chosen_reward'] == a['future_scores'][k] > rewards[pid][ci]
            assert p['chosen_reward'] > p['rejected_reward']
        if t == 1:   # the anchor is M1 = M_t: the judge's best against worst, sampled indices
            assert own['report']['anchor_judge'] is None
            for p in pairs:
                bw = best_worst(rewards[p['prompt_id']])[:2]
                assert p['rejected_index'] == bw[1] and (p['kind'] == 'future_chosen' or p['chosen_index'] == bw[0])
        else:
            assert all(p['rejected_index'] is None for p in pairs)
            again = run.engine.generate('m1', read_jsonl(i/'prompts.jsonl'), GenParams.sampling(cfg.sampling))   # M1, the same seed
            assert {x['prompt_id']: x['responses'] for x in again} == {pid: v['anchor_responses'] for pid, v in per.items()}
            assert any(v['anchor_responses'] != samples[pid] for pid, v in per.items())   # not M2's own samples
        with run.model(f'm{t}') as m:   # every reference log-prob is M_t's
            lp = sequence_logps(m, run.tokenizer, [p['prompt'] for p in pairs for _ in (0, 1)], [x for p in pairs for x in (p['chosen'], p['rejected'])], batch_size=1)[0].tolist()
        assert [x for p in pairs for x in (p['ref_chosen_logps'], p['ref_rejected_logps'])] == pytest.approx(lp, abs=1e-4)
    assert replaced >= 1   # the provisional model's samples did replace some chosen responses (seeded: the same every run)
    assert not [p for p in d.rglob('*') if 'provisional' in p.name] and 'provisional' not in (d/'checkpoints.json').read_text()
    assert not [n for n in run.base.peft_config if 'provisional' in n]
