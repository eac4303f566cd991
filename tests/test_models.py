"Tests of cream_nb.models.loading: loading M0, LoRA iterations on one base, 4/8-bit, the checkpoint registry."
import dataclasses, json, os, subprocess, sys, time
from pathlib import Path
import pytest, torch
from cream_nb.core.config import ModelConfig, preset
from cream_nb.models.loading import *

MCFG = preset('tiny').model                  # LoRA r=8, alpha=16 on every projection

def token_logps(model, ids):
    "log p(ids[:, 1:] | prefix), (batch, seq-1): plain log_softmax + gather in fp32."
    with torch.no_grad(): logits = model(input_ids=ids).logits[:, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]

@pytest.fixture(scope='module')
def ids():
    _, tok = load_model('tiny')
    return tok(["The capital of France is Paris.", "Two plus two is four, said the"], return_tensors='pt', padding=True).input_ids

def train_step(model, ids, lr=1e-2):
    "One AdamW step on the LM loss over the trainable parameters (stands in for SFT / DPO)."
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()
    return model.eval()

# ---------------------------------------------------------------- loading

def test_tiny_loads_fast_with_identical_weights():
    load_model('tiny')                                   # first call may convert the tokenizer into the cache
    t0 = time.time(); m1, tok = load_model('tiny'); dt = time.time() - t0
    assert dt < 5, f"tiny took {dt:.1f}s to load"
    m2, _ = load_model('tiny')
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert type(m1).__name__ == 'LlamaForCausalLM' and not m1.training
    c = m1.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (64, 2, 4, 2, 128)
    assert c.vocab_size == len(tok) == 49152 and c.tie_word_embeddings
    assert m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr()
    assert m1.dtype == torch.float32 and m1.device.type == ('cuda' if torch.cuda.is_available() else 'cpu')

def test_tiny_leaves_global_rng_alone():
    torch.manual_seed(123); expected = torch.rand(3)
    torch.manual_seed(123); load_model('tiny'); got = torch.rand(3)
    assert torch.equal(expected, got)

def test_tokenizer_pad_and_chat_template():
    _, tok = load_model('tiny')
    assert tok.pad_token == '<|im_end|>' and tok.pad_token_id == tok.eos_token_id == 2
    assert tok.padding_side == 'left'
    text = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True)
    assert text == ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n'
                    '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
    batch = tok(['a', 'a b c'], padding=True, return_tensors='pt')
    assert batch.input_ids[0, 0].item() == tok.pad_token_id and batch.attention_mask[0].tolist() == [0, 0, 1]

def test_prepare_tokenizer_fills_pad_and_template(tmp_path):
    _, tok = load_model('tiny')
    tok.pad_token = None; tok.chat_template = None; tok.padding_side = 'right'
    tok.save_pretrained(tmp_path)
    t = load_tokenizer(tmp_path)
    assert (t.pad_token, t.padding_side) == ('<|im_end|>', 'left') and '<|im_start|>' in t.chat_template

def test_model_config_spec_and_dtype():
    m, _ = load_model(ModelConfig(name='tiny', dtype='bfloat16'))
    assert m.dtype == torch.bfloat16
    m, _ = load_model('tiny', dtype=torch.float16)
    assert m.dtype == torch.float16
    assert resolve_dtype('auto', 'cpu') == torch.float32

def test_hub_id_code_path_on_a_local_folder(tmp_path, ids):
    m, tok = load_model('tiny')
    m.save_pretrained(tmp_path/'saved'); tok.save_pretrained(tmp_path/'saved')
    back, btok = load_model(str(tmp_path/'saved'))     # AutoModelForCausalLM.from_pretrained, as for a Hub id
    assert type(back).__name__ == 'LlamaForCausalLM' and btok.padding_side == 'left'
    torch.testing.assert_close(token_logps(back, ids), token_logps(m, ids), rtol=0, atol=1e-6)

@pytest.mark.parametrize('spec, expected', [
    ('', "model spec '' is invalid"),
    (42, "model spec 42 is invalid"),
    ('./no/such/model', "model path './no/such/model' does not exist"),
    ('org/na me', "could not load model 'org/na me'"),
])
def test_bad_specs_name_the_spec(spec, expected):
    with pytest.raises((ValueError, OSError)) as e: load_model(spec)
    assert expected in str(e.value)

def test_a_folder_without_a_model_is_refused(tmp_path):
    (tmp_path/'notes.txt').write_text('hi')
    with pytest.raises(FileNotFoundError, match="is not a model folder: expected a folder with config.json"): load_model(str(tmp_path))
    with pytest.raises(ValueError, match="finetune='partial' is invalid"): load_model('tiny', finetune='partial')

def test_cached_conversion_is_atomic_and_reused(tmp_path):
    calls = []
    def conv(tmp): calls.append(1); tmp.mkdir(); (tmp/'w').write_text('1')
    assert (cached_conversion(tmp_path/'c', conv)/'w').read_text() == '1'
    cached_conversion(tmp_path/'c', conv)
    assert len(calls) == 1
    def crash(tmp): tmp.mkdir(); (tmp/'half').write_text('x'); raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): cached_conversion(tmp_path/'d', crash)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith('.lock')) == ['c']

@pytest.mark.slow
def test_two_processes_convert_the_tokenizer_once_without_corruption(tmp_path):
    "Both processes get a loadable tokenizer; exactly one of them converted it."
    code = ("import time; from cream_nb.models.loading import *; from pathlib import Path; d = cache_dir()/'tokenizers'/EMBEDDED_NAME\n"
            "pre = d.exists(); t = load_tokenizer(embedded_tokenizer_dir()); print('converted' if not pre else 'waited', len(t))")
    env = {**os.environ, 'CREAM_NB_CACHE': str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert all(o[0].split()[-1] == '49152' for o in outs)
    assert sorted(p.name for p in (tmp_path/'tokenizers').iterdir()) == ['.SmolLM2-135M-Instruct.lock', 'SmolLM2-135M-Instruct']
    assert json.loads((tmp_path/'tokenizers'/EMBEDDED_NAME/'tokenizer.json').read_text())['model']['type'] == 'BPE'

# ---------------------------------------------------------------- LoRA iterations on one base

def test_use_model_m0_is_the_bare_base_and_adapters_differ(ids):
    base, _ = load_model('tiny')
    bare = token_logps(tiny_model(), ids)
    pm = add_adapter(base, 'm1', MCFG)
    torch.testing.assert_close(token_logps(pm, ids), bare, rtol=0, atol=1e-6)       # a fresh adapter is the identity
    pm = train_step(pm, ids)
    with use_model(pm, 'm0'): lp0 = token_logps(pm, ids)
    with use_model(pm, None): lpn = token_logps(pm, ids)
    with use_model(pm, 'm1'): lp1 = token_logps(pm, ids)
    torch.testing.assert_close(lp0, bare, rtol=0, atol=1e-6)
    torch.testing.assert_close(lpn, bare, rtol=0, atol=1e-6)
    assert (lp1 - lp0).abs().max() > 1e-2

def test_init_from_copies_and_use_model_restores_state(ids):
    pm = train_step(add_adapter(load_model('tiny')[0], 'm1', MCFG), ids)
    with use_model(pm, 'm1'): lp1 = token_logps(pm, ids)
    pm = add_adapter(pm, 'm2', MCFG, init_from='m1')
    assert pm.active_adapter == 'm2' and adapter_names(pm) == ['m1', 'm2']
    torch.testing.assert_close(token_logps(pm, ids), lp1, rtol=0, atol=1e-6)          # M2 starts as M1
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all('.m2.' in n for n in trainable)
    pm = train_step(pm, ids)
    lp2 = token_logps(pm, ids)
    assert (lp2 - lp1).abs().max() > 1e-3                                            # training M2 leaves M1 alone:
    with use_model(pm, 'm1'): torch.testing.assert_close(token_logps(pm, ids), lp1, rtol=0, atol=1e-6)
    assert pm.active_adapter == 'm2' and {n for n, p in pm.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(KeyError, match=r"model 'm5' is not loaded: this model has \['m0', 'm1', 'm2'\]"):
        with use_model(pm, 'm5'): pass

def test_adapter_saved_and_reloaded_gives_identical_logps(tmp_path, ids):
    pm = train_step(add_adapter(load_model('tiny')[0], 'm1', MCFG), ids)
    lp1 = token_logps(pm, ids)
    p = save_model(pm, tmp_path/'m1', 'm1')
    assert sorted(os.listdir(tmp_path)) == ['m1']
    assert sorted(os.listdir(p)) == ['adapter_config.json', 'adapter_model.safetensors']
    cfg = json.loads((p/'adapter_config.json').read_text())
    assert (cfg['base_model_name_or_path'], cfg['r'], cfg['lora_alpha']) == ('tiny', 8, 16)
    fresh = load_adapter(load_model('tiny')[0], p, 'm1')
    with use_model(fresh, 'm1'): torch.testing.assert_close(token_logps(fresh, ids), lp1, rtol=0, atol=0)
    assert not any(p.requires_grad for p in fresh.parameters())        # loaded for scoring
    # a second adapter onto the same base: one base, several M_t
    fresh = load_adapter(fresh, p, 'm1copy')
    with use_model(fresh, 'm1copy'): torch.testing.assert_close(token_logps(fresh, ids), lp1, rtol=0, atol=0)

def test_save_model_is_atomic(tmp_path, ids, monkeypatch):
    pm = add_adapter(load_model('tiny')[0], 'm1', MCFG)
    dest = save_model(pm, tmp_path/'m1')                                  # the active adapter by default
    before = (dest/'adapter_model.safetensors').read_bytes()
    pm = train_step(pm, ids)
    def crash(self, path, **kw):
        Path(path).mkdir(parents=True); (Path(path)/'adapter_model.safetensors').write_bytes(b'half'); raise OSError('disk full')
    monkeypatch.setattr(type(pm), 'save_pretrained', crash)
    with pytest.raises(OSError, match='disk full'): save_model(pm, dest, 'm1')
    assert (dest/'adapter_model.safetensors').read_bytes() == before and sorted(os.listdir(tmp_path)) == ['m1']

def test_full_mode_saves_full_weights(tmp_path, ids):
    m, tok = load_model('tiny', finetune='full')
    for p in m.parameters(): p.requires_grad_(True)
    m = train_step(m, ids)
    p = save_model(m, tmp_path/'m1', tokenizer=tok)
    assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(os.listdir(p))
    back, _ = load_model(p)
    torch.testing.assert_close(token_logps(back, ids), token_logps(m, ids), rtol=0, atol=1e-6)

def test_adapter_errors(tmp_path):
    pm = add_adapter(load_model('tiny')[0], 'm1', MCFG)
    with pytest.raises(ValueError, match="adapter 'm1' already exists"): add_adapter(pm, 'm1', MCFG)
    with pytest.raises(ValueError, match="adapter name 'm0' is invalid"): add_adapter(pm, 'm0', MCFG)
    with pytest.raises(KeyError, match=r"init_from='m7' is not an adapter of this model: adapters are \['m1'\]"): add_adapter(pm, 'm2', MCFG, init_from='m7')
    with pytest.raises(FileNotFoundError, match="does not exist: expected a folder written by save_model"): load_adapter(pm, tmp_path/'nope', 'm2')
    with pytest.raises(ValueError, match="'m0' is the base model"): save_model(pm, tmp_path/'x', 'm0')
    with pytest.raises(KeyError, match="adapter 'm3' is not on this model"): save_model(pm, tmp_path/'x', 'm3')

# ---------------------------------------------------------------- registry

def test_registry_round_trip(tmp_path):
    reg = CheckpointRegistry(tmp_path)
    assert reg.names() == [] and 'm0' not in reg
    reg.register('m0', 'embedded')
    (tmp_path/'m1').mkdir(); reg.register('m1', tmp_path/'m1', 'm0')
    (tmp_path/'iter1'/'model').mkdir(parents=True); reg.register('m2', tmp_path/'iter1'/'model', 'm1')
    outside = tmp_path.parent/(tmp_path.name + '-elsewhere'); outside.mkdir(); reg.register('m3', outside, 'm2')
    again = CheckpointRegistry(tmp_path)
    assert again.names() == ['m0', 'm1', 'm2', 'm3']
    assert again.path('m0') == 'embedded' and again.reference('m0') is None
    assert again.path('m1') == tmp_path/'m1' and again.reference('m1') == 'm0'
    assert again.path('m2') == tmp_path/'iter1'/'model' and again.reference('m2') == 'm1'
    assert again.path('m3') == outside.resolve()
    assert again.lineage('m3') == ['m3', 'm2', 'm1', 'm0']
    on_disk = json.loads((tmp_path/'checkpoints.json').read_text())
    assert on_disk['m2'] == {'path': 'iter1/model', 'reference': 'm1', 'relative': True}
    assert on_disk['m0'] == {'path': 'embedded', 'reference': None, 'relative': False}

def test_registry_missing_checkpoint_lists_the_registered(tmp_path):
    reg = CheckpointRegistry(tmp_path).register('m0', 'tiny').register('m1', tmp_path, 'm0')
    with pytest.raises(KeyError) as e: reg.path('m2')
    assert str(e.value) == f"checkpoint 'm2' is not registered in {tmp_path/'checkpoints.json'}: registered are ['m0', 'm1']"
    with pytest.raises(KeyError, match=r"checkpoint 'm2' \(the reference of 'm3'\) is not registered"): reg.register('m3', tmp_path, 'm2')
    with pytest.raises(KeyError, match="registered are none"): CheckpointRegistry(tmp_path/'empty').reference('m0')

def test_registry_refuses_a_malformed_file(tmp_path):
    (tmp_path/'checkpoints.json').write_text(json.dumps({'m1': {'reference': 'm0'}}))
    with pytest.raises(ValueError, match="entry 'm1' must be"): CheckpointRegistry(tmp_path)
    (tmp_path/'checkpoints.json').write_text('{"m1": ')
    with pytest.raises(Exception, match="checkpoints.json is corrupt"): CheckpointRegistry(tmp_path)

# ---------------------------------------------------------------- 4-bit / 8-bit

def test_4bit_forward_equals_the_dequantized_model(ids):
    import bitsandbytes as bnb
    q4, tok = load_model('tiny', quantization='4bit')
    layer = q4.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == 'nf4'
    ref = dequantized_copy(q4, tiny_model())
    torch.testing.assert_close(token_logps(q4, ids), token_logps(ref, ids), rtol=0, atol=1e-5)
    # nf4 is lossy: the logits differ from the unquantised model's, but not by much
    diff = (token_logps(q4, ids) - token_logps(tiny_model(), ids)).abs().max()
    assert 1e-5 < diff < 0.1

def _lora_grads(model, ids):
    "LoRA gradients with A and B set to fixed values (no dropout), after an eval-mode no-grad forward."
    token_logps(model, ids)                                   # as sampling / scoring do before training
    model = add_adapter(model, 'm1', dataclasses.replace(MCFG, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if 'lora_' in n: p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train(); model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

def test_qlora_gradients_equal_the_dequantized_model(ids):
    q4, _ = load_model('tiny', quantization='4bit')
    ref = dequantized_copy(q4, tiny_model())
    gq, gr = _lora_grads(q4, ids), _lora_grads(ref, ids)
    assert sorted(gq) == sorted(gr) and len(gq) == 2 * 7 * 2    # 2 layers x 7 projections x (A, B)
    for n in gq:
        assert gq[n] is not None, n
        torch.testing.assert_close(gq[n], gr[n], rtol=1e-4, atol=1e-6)

def test_qlora_training_step_lowers_the_loss(ids):
    pm = add_adapter(load_model('tiny', quantization='4bit')[0], 'm1', MCFG).train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses

def _has_avx512_bf16():
    try: return 'avx512_bf16' in Path('/proc/cpuinfo').read_text()
    except OSError: return False

@pytest.mark.skipif(not _has_avx512_bf16(), reason="the bitsandbytes CPU repacking only happens on CPUs with AVX512-BF16")
def test_without_the_workaround_bitsandbytes_loses_lora_gradients(ids):
    "Documents why `_disable_cpu_4bit_repacking` exists; when this fails, bitsandbytes has fixed it."
    import bitsandbytes as bnb
    q4, _ = load_model('tiny', quantization='4bit')
    for m in q4.modules():
        if isinstance(m, bnb.nn.Linear4bit): m.support_avx512bf16_for_cpu = True     # bitsandbytes' default
    ref = dequantized_copy(q4, tiny_model())
    gq, gr = _lora_grads(q4, ids), _lora_grads(ref, ids)
    wrong = [n for n in gq if gq[n] is None or not torch.allclose(gq[n], gr[n], rtol=1e-4, atol=1e-6)]
    assert wrong, "bitsandbytes no longer drops gradients after CPU repacking"

def test_8bit_loads_and_trains(ids):
    import bitsandbytes as bnb
    q8, _ = load_model('tiny', quantization='8bit')
    assert isinstance(q8.model.layers[1].self_attn.o_proj, bnb.nn.Linear8bitLt)
    torch.testing.assert_close(token_logps(q8, ids), token_logps(tiny_model(), ids), rtol=0, atol=0.05)
    pm = add_adapter(q8, 'm1', MCFG).train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses

def test_quantization_errors():
    with pytest.raises(ValueError, match="needs finetune='lora'"): load_model('tiny', quantization='8bit', finetune='full')
    with pytest.raises(ValueError, match="quantization='3bit' is invalid"): load_model('tiny', quantization='3bit')

# ---------------------------------------------------------------- the embedded model

@pytest.mark.slow
def test_embedded_converts_once_and_knows_paris(tmp_path, monkeypatch):
    monkeypatch.setenv('CREAM_NB_CACHE', str(tmp_path))
    t0 = time.time(); model, tok = load_model('embedded'); first = time.time() - t0
    files = sorted(os.listdir(tmp_path/'models'/EMBEDDED_NAME))
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'generation_config.json'} <= set(files), files
    del model
    t0 = time.time(); model, tok = load_model('embedded'); second = time.time() - t0
    print(f"embedded: first load (with conversion) {first:.1f}s, second load (cached) {second:.1f}s")
    assert second < first / 2, (first, second)
    assert type(model).__name__ == 'LlamaForCausalLM' and model.config.num_hidden_layers == 30 and model.name_or_path == 'embedded'
    assert not hasattr(model.config, 'quantization_config')
    ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is the capital of France?'}],
                                  add_generation_prompt=True, return_tensors='pt', return_dict=True).to(model.device)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)
    assert 'Paris' in answer, answer
