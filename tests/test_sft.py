"Seed SFT: prompt/completion conversion, labels -100 on every prompt token, training lowers the loss (full, LoRA, QLoRA), M1 saved."
import math
from pathlib import Path
import pytest
import torch
from cream_nb.core.config import ModelConfig, SFTConfig
from cream_nb.models.logprobs import build_sequence
from cream_nb.stages.sft import sft_examples, sft_trainer, train_sft
from cream_nb.stages.trainer import sft_training_args

RECS = [{'id': f's{i}', 'messages': [{'role': 'user', 'content': f'What is {i} plus {i}?'}, {'role': 'assistant', 'content': f'{i} plus {i} is {2*i}.'}]}
        for i in range(16)]

@pytest.fixture(scope='module')
def tiny():
    from cream_nb.models.loading import load_model
    return load_model('tiny')

def test_examples_split_prompt_and_answer():
    multi = {'id': 'm', 'messages': [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
                                     {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Bye'},
                                     {'role': 'assistant', 'content': 'Goodbye.'}]}
    ex = sft_examples([RECS[0], multi])
    assert ex[0] == {'prompt': [RECS[0]['messages'][0]], 'completion': [RECS[0]['messages'][1]]}
    assert ex[1]['prompt'] == multi['messages'][:-1] and ex[1]['completion'] == [{'role': 'assistant', 'content': 'Goodbye.'}]

@pytest.mark.parametrize('msgs, err', [
    ([{'role': 'user', 'content': 'Hi'}], 'messages must be a list of >= 2'),
    ([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': '  '}], 'the last message must be a non-empty assistant answer'),
    ([{'role': 'assistant', 'content': 'Hi'}, {'role': 'user', 'content': 'Yo'}], 'the last message must be a non-empty assistant answer'),
    ([{'role': 'system', 'content': 'S'}, {'role': 'assistant', 'content': 'A'}], 'no user turn before the answer'),
    ('not a list', 'messages must be a list'),
])
def test_bad_records_name_the_row(msgs, err):
    with pytest.raises(ValueError, match=rf"seed SFT row 1 \(id 'bad'\): {err}"): sft_examples([RECS[0], {'id': 'bad', 'messages': msgs}])

def test_training_args_follow_our_config():
    a = sft_training_args(SFTConfig(epochs=2, learning_rate=3e-4, batch_size=4, grad_accum=2, warmup_ratio=0.2, max_length=128), '/tmp/x', seed=7)
    assert (a.num_train_epochs, a.learning_rate, a.per_device_train_batch_size, a.gradient_accumulation_steps) == (2, 3e-4, 4, 2)
    assert (a.warmup_steps, a.lr_scheduler_type.value, a.max_length, a.seed, a.data_seed) == (0.2, 'cosine', 128, 7, 7)
    assert a.completion_only_loss is True and a.assistant_only_loss is False and a.packing is False
    assert (a.save_strategy.value, a.save_steps) == ('steps', 50) and a.report_to == [] and a.activation_checkpointing is False   # sft.save_steps
    assert sft_training_args(SFTConfig(save_steps=0), '/tmp/x').save_strategy.value == 'no'
    if not torch.cuda.is_available(): assert a.bf16 is False and a.use_cpu is True     # no bf16 autocast on a CPU

@pytest.mark.parametrize('rec', [RECS[3], {'id': 'multi', 'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'},
                                                                        {'role': 'user', 'content': 'And 2+2?'}, {'role': 'assistant', 'content': 'Four.'}]}])
def test_prompt_tokens_get_label_minus_100(tiny, tmp_path, rec):
    model, tok = tiny
    tr = sft_trainer(model, tok, [rec], SFTConfig(max_length=256), tmp_path)
    row = tr.train_dataset[0]
    prompt_ids, n = build_sequence(tok, rec['messages'][:-1], '')
    assert row['input_ids'][:n] == prompt_ids[:n]                       # the prompt the model is sampled after
    assert row['labels'][:n] == [-100] * n                              # earlier assistant turns included: not trained
    assert row['labels'][n:] == row['input_ids'][n:]
    assert tok.decode(row['labels'][n:]) == rec['messages'][-1]['content'] + '<|im_end|>\n'
    batch = tr.data_collator([row, tr.train_dataset[0]])
    assert (batch['labels'] != -100).sum().item() == 2 * (len(row['input_ids']) - n)

def test_long_examples_are_truncated_to_max_length(tiny, tmp_path):
    model, tok = tiny
    long = {'id': 'long', 'messages': [{'role': 'user', 'content': 'Talk.'}, {'role': 'assistant', 'content': 'blah ' * 300}]}
    tr = sft_trainer(model, tok, [long], SFTConfig(max_length=64), tmp_path)
    assert len(tr.train_dataset[0]['input_ids']) == 64

def test_empty_dataset_is_an_error(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(ValueError, match='seed SFT dataset is empty'): train_sft(model, tok, [], SFTConfig(), tmp_path/'m1', progress=False)

def _lrs(m): return [h['learning_rate'] for h in m['history']]

@pytest.mark.slow
def test_full_sft_lowers_the_loss_and_saves_m1(tmp_path):
    from cream_nb.models.loading import load_model
    model, tok = load_model('tiny')
    cfg = SFTConfig(epochs=6, learning_rate=1e-3, batch_size=16, max_length=256)      # one batch = the same data every step
    m = train_sft(model, tok, RECS, cfg, tmp_path/'m1', seed=0, progress=False)
    losses = [h['loss'] for h in m['history']]
    assert m['steps'] == 6 and m['examples'] == 16
    assert losses[-1] < losses[0] - 0.3, losses
    # cosine with 10% warmup: ceil(0.1 * 6) = 1 warmup step from 0, then 0.5 (1 + cos(pi k / 5)) of the peak
    assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(_lrs(m), [0.0] + [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m1']                        # no Trainer checkpoints left behind
    assert (tmp_path/'m1'/'model.safetensors').exists() and (tmp_path/'m1'/'tokenizer.json').exists()
    reloaded, _ = load_model(str(tmp_path/'m1'))
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in reloaded.state_dict().items())

@pytest.mark.slow
def test_lora_sft_trains_only_the_adapter(tmp_path):
    from cream_nb.models.loading import add_adapter, load_adapter, load_model
    base, tok = load_model('tiny')
    pm = add_adapter(base, 'm1', ModelConfig(lora_r=8, lora_alpha=16))
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if 'lora_' not in n}
    m = train_sft(pm, tok, RECS, SFTConfig(epochs=6, learning_rate=1e-2, batch_size=16, max_length=256), tmp_path/'m1', seed=0, progress=False)
    assert m['loss_last'] < m['loss_first'] - 0.2, m['history']
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)
    assert (tmp_path/'m1'/'adapter_model.safetensors').exists() and not (tmp_path/'m1'/'model.safetensors').exists()
    again = load_adapter(load_model('tiny')[0], tmp_path/'m1', 'm1')
    trained = {n: p for n, p in pm.named_parameters() if 'lora_' in n}
    reloaded = {n: p for n, p in again.named_parameters() if 'lora_' in n}
    assert sorted(trained) == sorted(reloaded) and all(torch.equal(trained[n], reloaded[n]) for n in trained)

@pytest.mark.slow
def test_qlora_sft_on_a_4bit_base(tmp_path):
    import bitsandbytes as bnb
    from cream_nb.models.loading import add_adapter, load_model
    base, tok = load_model('tiny', quantization='4bit')
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    pm = add_adapter(base, 'm1', ModelConfig(lora_r=8, lora_alpha=16, quantization='4bit'))
    lora = {n: p.detach().clone() for n, p in pm.named_parameters() if 'lora_' in n}
    m = train_sft(pm, tok, RECS, SFTConfig(epochs=4, learning_rate=1e-2, batch_size=16, max_length=256), tmp_path/'m1', seed=0, progress=False)
    assert m['loss_last'] < m['loss_first'] - 0.1, m['history']
    assert any(not torch.equal(p, lora[n]) for n, p in pm.named_parameters() if n in lora)
    assert (tmp_path/'m1'/'adapter_model.safetensors').exists()

@pytest.mark.slow
def test_sft_on_the_offline_seed_data(tmp_path):
    "The seed records the data stage makes (long SciQ answers) train as they are; long ones are cut at max_length."
    from cream_nb.data.sources import load_seed_sft
    from cream_nb.models.loading import load_model
    model, tok = load_model('tiny')
    seed = load_seed_sft('offline', limit=4, seed=0)
    m = train_sft(model, tok, seed, SFTConfig(epochs=1, batch_size=4, max_length=128), tmp_path/'m1', seed=0, progress=False)
    assert m['examples'] == 4 and m['steps'] == 1 and math.isfinite(m['loss_first'])
    assert m['history'][0]['num_tokens'] <= 4 * 128


def test_each_training_runs_in_its_own_precision_in_one_process(tmp_path):
    """sft.precision reaches the matmuls, and a later training on the same model is not held in the earlier one's
    precision (Trainer's own bf16=True left accelerate's autocast wrapper on the model: the 2nd and 4th trainings below
    then ran in fp32). fp32 after bf16 gives the first fp32 run's loss exactly; bf16 moves it, a little."""
    from dataclasses import replace
    from transformers import set_seed
    from cream_nb.core.config import preset
    from cream_nb.models.loading import load_model, add_adapter
    from cream_nb.models.precision import bf16_matmuls
    cfg = preset('tiny')
    model, tok = load_model('tiny')
    if not bf16_matmuls():   # a machine without bf16 matmuls refuses an explicit bf16 before any work
        with pytest.raises(RuntimeError, match="sft.precision='bf16' needs bf16 matmul instructions"):
            train_sft(model, tok, RECS[:8], replace(cfg.sft, precision='bf16'), tmp_path/'x')
        return
    seen, out = [], []
    for k, prec in enumerate(('fp32', 'bf16', 'fp32', 'bf16')):
        set_seed(1)
        if 'sft' in getattr(model, 'peft_config', {}): model.delete_adapter('sft')
        model = add_adapter(model, 'sft', cfg.model)
        dtypes = set()
        q = next(m for n, m in model.named_modules() if n.endswith('q_proj.base_layer'))
        h = q.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
        r = train_sft(model, tok, RECS[:8], replace(cfg.sft, precision=prec, epochs=1, save_steps=0), tmp_path/f'm{k}', seed=0, progress=False)
        h.remove()
        seen.append(dtypes); out.append(r['loss_last'])
    assert seen == [{torch.float32}, {torch.bfloat16}, {torch.float32}, {torch.bfloat16}]
    assert out[2] == out[0] and out[3] == out[1] and out[1] != out[0] and abs(out[1] - out[0]) < 0.05 * abs(out[0])
