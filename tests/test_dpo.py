"CREAM DPO: the loss against the formula by hand, the trainer on pairs from the core stages, and 2 processes under accelerate."
import json, math, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from datasets import Dataset
from cream_nb.core.config import DPOConfig, ModelConfig, SamplingConfig
from cream_nb.stages.dpo import CreamDPOCollator, cream_loss, pair_consistency, policy_logps, tokenize_pairs, train_dpo, dropout_off

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def log_sigmoid(x): return -np.logaddexp(0.0, -x)       # float64, by hand

def loss_by_hand(pc, pr, rc, rr, C, beta=0.1):
    h = (pc - rc) - (pr - rr)
    return -(C * log_sigmoid(beta * h) + (1 - C) * log_sigmoid(-beta * h))

# ---------------------------------------------------------------------------------------------- the loss

@pytest.mark.parametrize('C', [0.0, 0.3, 1.0])
@pytest.mark.parametrize('mode', ['avg', 'dyn'])
def test_cream_loss_equals_the_formula(C, mode):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (-rng.uniform(0, 80, 16) for _ in range(4))
    # avg: one set-level rate for all pairs (a float); dyn: one rate per pair (C for half of them, others random)
    c = C if mode == 'avg' else np.where(np.arange(16) % 2 == 0, C, rng.uniform(0, 1, 16))
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    losses, chosen_r, rejected_r = cream_loss(t(pc), t(pr), t(rc), t(rr), c if mode == 'avg' else t(c), beta=0.1)
    np.testing.assert_allclose(losses.numpy(), loss_by_hand(pc, pr, rc, rr, c), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chosen_r.numpy(), 0.1 * (pc - rc), rtol=1e-12)
    np.testing.assert_allclose(rejected_r.numpy(), 0.1 * (pr - rr), rtol=1e-12)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad

def test_cream_loss_with_rate_one_is_standard_dpo():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(32, generator=g) * 60 for _ in range(4))
    for beta in (0.1, 0.5):
        dpo = -F.logsigmoid(beta * ((pc - pr) - (rc - rr)))          # Rafailov et al. eq. 7, as in eric-mitchell/dpo
        torch.testing.assert_close(cream_loss(pc, pr, rc, rr, 1.0, beta)[0], dpo)
        torch.testing.assert_close(cream_loss(pc, pr, rc, rr, torch.ones(32), beta)[0], dpo)

def _grad_h(C, h0=0.0, beta=0.1):
    h = torch.tensor([h0], dtype=torch.float64, requires_grad=True)
    z = torch.zeros(1, dtype=torch.float64)
    cream_loss(h, z, z, z, C, beta)[0].sum().backward()
    return h.grad.item()

@pytest.mark.parametrize('C', [0.51, 0.7, 1.0])
def test_gradient_pushes_h_up_when_rate_above_half(C):
    assert _grad_h(C) < 0                                 # at h = 0 gradient descent moves h by -grad > 0

@pytest.mark.parametrize('C', [0.0, 0.3, 0.49])
def test_gradient_pushes_h_down_when_rate_below_half(C):
    assert _grad_h(C) > 0

@pytest.mark.parametrize('C', [0.2, 0.5, 0.9])
def test_loss_is_smallest_where_sigmoid_beta_h_equals_the_rate(C):
    h_star = math.log(C / (1 - C)) / 0.1
    assert _grad_h(C, h_star - 1) < 0 < _grad_h(C, h_star + 1)
    assert abs(_grad_h(C, h_star)) < 1e-12

@settings(max_examples=60, deadline=None)
@given(C=st.floats(0.01, 0.99), h=st.floats(-200, 200), beta=st.floats(0.01, 1.0))
def test_gradient_is_beta_times_sigmoid_minus_rate(C, h, beta):
    # dL/dh = -beta (C - sigmoid(beta h)): zero exactly where sigmoid(beta h) = C
    assert math.isclose(_grad_h(C, h, beta), -beta * (C - 1 / (1 + math.exp(-beta * h))), rel_tol=1e-9, abs_tol=1e-12)

def test_stable_at_large_margins():
    h = torch.tensor([1e4, -1e4, 1e4, -1e4, 1e4], requires_grad=True)
    z = torch.zeros(5)
    C = torch.tensor([1.0, 1.0, 0.3, 0.3, 0.0])
    losses, *_ = cream_loss(h, z, z, z, C, beta=0.1)
    losses.sum().backward()
    # beta h = +-1000: log sigmoid(1000) = 0, log sigmoid(-1000) = -1000
    torch.testing.assert_close(losses, torch.tensor([0.0, 1000.0, 700.0, 300.0, 1000.0]))
    torch.testing.assert_close(h.grad, torch.tensor([0.0, -0.1, 0.07, -0.03, 0.1]))
    assert torch.isfinite(losses).all() and torch.isfinite(h.grad).all()
    assert torch.log(torch.sigmoid(torch.tensor(-1000.0))) == -math.inf      # the naive form fails here

def test_bad_consistency_shape_is_an_error():
    z = torch.zeros(4)
    with pytest.raises(ValueError, match=r'shape \(4,\) \(one rate per pair\), got shape \(3,\)'): cream_loss(z, z, z, z, torch.ones(3))

# ---------------------------------------------------------------------------------------------- rates and tokenising

ROWS = [dict(prompt_id='a', set_consistency=0.25, prompt_consistency=0.1), dict(prompt_id='b', set_consistency=0.25, prompt_consistency=0.4)]

def test_pair_consistency_modes():
    assert pair_consistency(ROWS, 'avg') == [0.25, 0.25]
    assert pair_consistency(ROWS, 'dyn') == [0.1, 0.4]
    assert pair_consistency(Dataset.from_list(ROWS), 'dyn') == [0.1, 0.4]
    assert pair_consistency(ROWS, 1.0) == [1.0, 1.0] and pair_consistency(ROWS, 0) == [0.0, 0.0]
    with pytest.raises(ValueError, match="'avg', 'dyn' or a rate"): pair_consistency(ROWS, True)
    with pytest.raises(ValueError, match=r"row 1 \(prompt 'b'\): consistency rate -0.1 is outside"):
        pair_consistency([ROWS[0], dict(ROWS[1], prompt_consistency=-0.1)], 'dyn')

@pytest.fixture(scope='module')
def tiny():
    from cream_nb.models.loading import load_model
    return load_model('tiny')

def _toy_pairs(**over):
    row = dict(prompt_id='p0', prompt=[{'role': 'user', 'content': 'Hi'}], chosen='Hello there.', rejected='Go away',
               prompt_consistency=0.6, set_consistency=0.5, ref_chosen_logps=-10.0, ref_rejected_logps=-12.0)
    return Dataset.from_list([{**row, **over}])

def test_tokenize_pairs_errors_name_the_row(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match=r"pairs row 0 \(prompt 'p0'\): ref_chosen_logps is nan"):
        tokenize_pairs(_toy_pairs(ref_chosen_logps=float('nan')), tok)
    with pytest.raises(ValueError, match=r"prompt \+ chosen is \d+ tokens, longer than max_length=10"):
        tokenize_pairs(_toy_pairs(), tok, max_length=10)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['ref_chosen_logps', 'ref_rejected_logps'\]"):
        tokenize_pairs(_toy_pairs().remove_columns(['ref_chosen_logps', 'ref_rejected_logps']), tok)

def test_collated_logps_equal_sequence_logps(tiny):
    "The trainer's log-probs are computed like rewarding's (left padding, position ids, logits_to_keep)."
    from cream_nb.models.logprobs import sequence_logps
    model, tok = tiny
    prompts = [[{'role': 'user', 'content': q}] for q in ('What is 1 + 1?', 'A much longer question about colours and shapes?')]
    ds = Dataset.from_dict(dict(prompt_id=['x', 'y'], prompt=prompts, chosen=['Two.', 'Red circles and blue squares, mostly.'],
                                rejected=['Eleven, I think, or maybe three', 'No'], prompt_consistency=[0.5, 0.5], set_consistency=[0.5, 0.5],
                                ref_chosen_logps=[0.0, 0.0], ref_rejected_logps=[0.0, 0.0]))
    batch = CreamDPOCollator(tok.pad_token_id)(list(tokenize_pairs(ds, tok)))
    with torch.no_grad(): pc, pr = policy_logps(model.eval(), batch)
    ref, _ = sequence_logps(model, tok, prompts * 2, list(ds['chosen']) + list(ds['rejected']), batch_size=1)   # each alone
    torch.testing.assert_close(torch.cat([pc, pr]), ref.float(), rtol=1e-6, atol=1e-5)

# ---------------------------------------------------------------------------------------------- training on core-stage pairs

QUESTIONS = ['What is 2 + 2?', 'Name a primary colour.', 'Why is the sky blue?', 'What do bees make?',
             'Which is heavier, a kilo of iron or a kilo of feathers?', 'Say hello.', 'What is the capital of France?', 'Count to three.']

def core_stage_pairs(tmp_path):
    "M1 (a LoRA adapter with random weights on the tiny model) samples, M1 and M0 score, rates and pairs as the loop makes them."
    from cream_nb.stages.consistency import consistency_rates
    from cream_nb.models.loading import add_adapter, load_model, use_model
    from cream_nb.stages.preferences import preference_pairs
    from cream_nb.stages.rewards import iteration_logps, iteration_rewards
    from cream_nb.stages.sampling import sample_responses
    model, tok = load_model('tiny')
    mcfg = ModelConfig(lora_r=8, lora_alpha=16)
    pm = add_adapter(model, 'm1', mcfg)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.05)
    prompts = [{'id': f'q{i}', 'messages': [{'role': 'user', 'content': q}]} for i, q in enumerate(QUESTIONS)]
    with use_model(pm, 'm1'):
        samples = sample_responses(pm.eval(), tok, prompts, SamplingConfig(n_responses=4, max_new_tokens=12, seed=0), progress=False)
    lps = iteration_logps(pm, tok, 1, prompts, samples, tmp_path/'iter1', batch_size=16)
    rw = iteration_rewards(lps, 1)
    rates = consistency_rates({k: v['current'] for k, v in rw.items()}, {k: v['previous'] for k, v in rw.items()})
    pairs, stats = preference_pairs(prompts, samples, {k: v['current'] for k, v in rw.items()}, rates=rates,
                                    ref_logps={k: v['logps'] for k, v in lps['m1'].items()})
    assert stats['pairs'] >= 6, stats
    return add_adapter(pm, 'm2', mcfg, init_from='m1'), tok, pairs

def _params(pm, tag): return {n: p.detach().clone() for n, p in pm.named_parameters() if f'.{tag}.' in n}

@pytest.mark.slow
def test_dpo_steps_lower_the_loss_and_move_only_the_new_adapter(tmp_path):
    pm, tok, pairs = core_stage_pairs(tmp_path)
    m1, m2 = _params(pm, 'm1'), _params(pm, 'm2')
    forwards = []
    hook = pm.get_base_model().register_forward_pre_hook(lambda mod, args, kw: forwards.append(kw['input_ids'].shape[0]), with_kwargs=True)
    cfg = DPOConfig(learning_rate=1e-3, batch_size=len(pairs), epochs=6, warmup_ratio=0.0, max_length=256)   # the same batch every step
    metrics = train_dpo(pm, tok, pairs, cfg, tmp_path/'m2', consistency=1.0, seed=0, progress=False)
    hook.remove()
    assert metrics['steps'] == 6 and metrics['pairs'] == len(pairs)
    # one forward pass per step over (chosen; rejected), nothing else: no reference forward pass
    assert forwards == [2 * len(pairs)] * 6
    assert math.isclose(metrics['loss_first'], math.log(2), abs_tol=1e-6)            # M2 = M1 = reference at step 0
    losses = [h['loss'] for h in metrics['history']]
    assert losses[-1] < losses[0] - 0.02 and all(b < a for a, b in zip(losses[1:], losses[2:])), losses
    assert metrics['history'][-1]['rewards/margins'] > 0 and metrics['history'][-1]['rewards/accuracies'] == 1.0
    assert metrics['consistency/rate'] == 1.0 and metrics['consistency_mode'] == 'fixed'
    assert any(not torch.equal(p, m2[n]) for n, p in _params(pm, 'm2').items())
    assert all(torch.equal(p, m1[n]) for n, p in _params(pm, 'm1').items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ['iter1', 'm2']            # no Trainer checkpoints left behind
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path/'m2'/'adapter_model.safetensors'))
    trained = {n.replace('.m2', ''): p for n, p in _params(pm, 'm2').items()}
    assert len(saved) == len(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)

@pytest.mark.slow
def test_policy_equals_stored_reference_before_training(tmp_path):
    pm, tok, pairs = core_stage_pairs(tmp_path)
    batch = CreamDPOCollator(tok.pad_token_id)(list(tokenize_pairs(pairs, tok)))
    with dropout_off(pm), torch.no_grad(): pc, pr = policy_logps(pm.train(), batch)
    # float32 sums of ~13 log-probs near -11: one float32 step at |150| is 1.5e-5, so compare relatively
    torch.testing.assert_close(pc, torch.tensor(pairs['ref_chosen_logps'], dtype=torch.float32), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(pr, torch.tensor(pairs['ref_rejected_logps'], dtype=torch.float32), rtol=1e-6, atol=1e-5)

@pytest.mark.slow
def test_trainer_uses_the_reference_logps_of_the_dataset(tmp_path):
    "Shift the stored reference log-probs: the step-0 loss moves exactly as the formula says, with the policy = true reference."
    pm, tok, pairs = core_stage_pairs(tmp_path)
    n = len(pairs)
    shift_c, shift_r = np.linspace(-30, 30, n), np.linspace(10, -5, n)
    moved = pairs.map(lambda r, i: {'ref_chosen_logps': r['ref_chosen_logps'] + shift_c[i],
                                    'ref_rejected_logps': r['ref_rejected_logps'] + shift_r[i]}, with_indices=True)
    forwards = []
    hook = pm.get_base_model().register_forward_pre_hook(lambda mod, args, kw: forwards.append(1), with_kwargs=True)
    metrics = train_dpo(pm, tok, moved, DPOConfig(learning_rate=1e-3, batch_size=n, epochs=1, max_length=256), tmp_path/'m2',
                        consistency='dyn', seed=0, progress=False)
    hook.remove()
    assert forwards == [1] and metrics['steps'] == 1
    # policy == original reference, so h = -(shift_c - shift_r); each pair weighted by its own c_x
    c = np.array(pairs['prompt_consistency'])
    expected = loss_by_hand(np.zeros(n), np.zeros(n), shift_c, shift_r, c).mean()
    assert math.isclose(metrics['loss_first'], expected, rel_tol=1e-5), (metrics['loss_first'], expected)
    assert math.isclose(metrics['history'][0]['rewards/chosen'], float(np.mean(-0.1 * shift_c)), abs_tol=1e-5)
    assert math.isclose(metrics['consistency/rate'], float(c.mean()), abs_tol=1e-6)

@pytest.mark.slow
def test_rate_below_half_pushes_the_margin_down(tmp_path):
    pm, tok, pairs = core_stage_pairs(tmp_path)
    cfg = DPOConfig(learning_rate=1e-3, batch_size=len(pairs), epochs=4, warmup_ratio=0.0, max_length=256)
    metrics = train_dpo(pm, tok, pairs, cfg, tmp_path/'m2', consistency=0.0, seed=0, progress=False)
    margins = [h['rewards/margins'] for h in metrics['history']]
    assert margins[-1] < 0 and metrics['loss_last'] < metrics['loss_first'], metrics['history']

@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    "Half batches accumulated twice give the update of the whole batch: the per-batch mean loss is divided by the steps once."
    pm, tok, pairs = core_stage_pairs(tmp_path)
    pairs = pairs.select(range(6))
    start = _params(pm, 'm2')
    def run(batch_size, grad_accum):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n in start: p.copy_(start[n])
        forwards = []
        hook = pm.get_base_model().register_forward_pre_hook(lambda mod, args, kw: forwards.append(kw['input_ids'].shape[0]), with_kwargs=True)
        cfg = DPOConfig(learning_rate=0.5, batch_size=batch_size, grad_accum=grad_accum, epochs=1, warmup_ratio=0.0, max_length=256)
        m = train_dpo(pm, tok, pairs, cfg, tmp_path/f'm2-{grad_accum}', consistency=1.0, seed=0, progress=False, optim='sgd')
        hook.remove()
        return m, forwards, _params(pm, 'm2')
    whole, f1, w1 = run(6, 1)
    accum, f2, w2 = run(3, 2)
    assert (whole['steps'], accum['steps']) == (1, 1) and f1 == [12] and f2 == [6, 6]
    assert math.isclose(whole['loss_first'], accum['loss_first'], abs_tol=1e-6)
    assert max((w1[n] - start[n]).abs().max().item() for n in w1) > 1e-4           # SGD: the update is lr * gradient
    assert all(torch.allclose(w1[n], w2[n], atol=1e-7, rtol=1e-5) for n in w1)

def test_empty_pairs_is_an_error(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match='pairs dataset is empty'):
        train_dpo(model, tok, _toy_pairs().select([]), DPOConfig(), tmp_path/'out', progress=False)
    assert not (tmp_path/'out').exists()

# ---------------------------------------------------------------------------------------------- two processes

def _run(cmd):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'CUDA_VISIBLE_DEVICES': ''}
    r = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tmp_path):
    from safetensors.torch import load_file
    script = ROOT/'tests'/'scripts'/'dpo_dist.py'
    # the shipped DDP config; without GPUs accelerate's launcher starts CPU processes that talk over gloo
    _run([BIN/'accelerate', 'launch', '--config_file', ROOT/'configs'/'accelerate'/'ddp.yaml', '--num_processes', '2', script, tmp_path/'two', 2])
    _run([sys.executable, script, tmp_path/'one', 4])                 # one process, the same global batch of 4 pairs
    info = [json.loads((tmp_path/'two'/f'rank{r}.json').read_text()) for r in (0, 1)]
    assert [i['process_index'] for i in info] == [0, 1] and {i['num_processes'] for i in info} == {2}
    assert {i['distributed_type'] for i in info} == {'DistributedType.MULTI_CPU'}
    assert [i['steps'] for i in info] == [2, 2]                      # 8 pairs / (2 per process * 2 processes)
    w0, w1 = (load_file(str(tmp_path/'two'/f'rank{r}.safetensors')) for r in (0, 1))
    init, one = load_file(str(tmp_path/'two'/'init.safetensors')), load_file(str(tmp_path/'one'/'rank0.safetensors'))
    assert sorted(w0) == sorted(w1) == sorted(init) and len(w0) > 0
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the two processes ended with different weights"
    assert max((w0[k] - init[k]).abs().max().item() for k in w0) > 1e-3          # they trained
    # gradients were averaged across the processes: the same result as one process on the whole batch
    assert all(torch.allclose(w0[k], one[k], atol=1e-4) for k in w0)
    assert (tmp_path/'two'/'model'/'adapter_model.safetensors').exists()       # saved once, by the main process


def test_dpo_runs_in_its_own_precision_after_another_training(tmp_path):
    """dpo.precision reaches the matmuls of a DPO run that follows another training in the same process (as in the
    loop): fp32, bf16, fp32 on one model; the fp32 runs agree exactly, bf16 (matmuls only; output layer and loss fp32)
    moves the loss a little. A machine without bf16 matmuls refuses the explicit bf16 instead."""
    from dataclasses import replace
    from cream_nb.models.precision import bf16_matmuls
    pm, tok, pairs = core_stage_pairs(tmp_path)
    cfg = DPOConfig(learning_rate=1e-3, batch_size=len(pairs), epochs=2, warmup_ratio=0.0, max_length=256)
    if not bf16_matmuls():
        with pytest.raises(RuntimeError, match="dpo.precision='bf16' needs bf16 matmul instructions"):
            train_dpo(pm, tok, pairs, replace(cfg, precision='bf16'), tmp_path/'x', consistency=1.0, progress=False)
        return
    start = _params(pm, 'm2')
    q = next(m for n, m in pm.named_modules() if n.endswith('q_proj.base_layer'))
    seen, losses = [], []
    for k, prec in enumerate(('fp32', 'bf16', 'fp32')):
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if n in start: p.copy_(start[n])   # every run from the same M2 start
        dtypes = set(); h = q.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        metrics = train_dpo(pm, tok, pairs, replace(cfg, precision=prec), tmp_path/f'm2-{k}', consistency=1.0, seed=0, progress=False)
        h.remove(); seen.append(dtypes); losses.append(metrics['loss_last'])
    assert seen == [{torch.float32}, {torch.bfloat16}, {torch.float32}]
    assert losses[2] == losses[0] and losses[1] != losses[0] and abs(losses[1] - losses[0]) < 0.1 * abs(losses[0]) + 0.01
