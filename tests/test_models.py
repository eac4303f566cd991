"Tests of cream_nb.models: loading M0, LoRA iterations on one base, 4/8-bit, the checkpoint registry."
import time
import pytest, torch
from cream_nb.models import *

def test_tiny_loads_fast_with_identical_weights():
    load_model('tiny')                                   # first call may convert the tokenizer into the cache
    t0 = time.time(); m1, tok = load_model('tiny'); dt = time.time() - t0
    assert dt < 5, f"tiny took {dt:.1f}s to load"
    m2, _ = load_model('tiny')
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert type(m1).__name__ == 'LlamaForCausalLM'
    c = m1.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) == (64, 2, 4, 2, 128)
    assert c.vocab_size == len(tok) == 49152 and c.tie_word_embeddings
    assert m1.lm_head.weight.data_ptr() == m1.model.embed_tokens.weight.data_ptr()

def test_tiny_leaves_global_rng_alone():
    torch.manual_seed(123); expected = torch.rand(3)
    torch.manual_seed(123); load_model('tiny'); got = torch.rand(3)
    assert torch.equal(expected, got)

def test_tokenizer_pad_and_chat_template():
    _, tok = load_model('tiny')
    assert tok.pad_token == '<|im_end|>' and tok.pad_token_id == tok.eos_token_id == 2
    assert tok.padding_side == 'left'
    text = tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}], tokenize=False, add_generation_prompt=True)
    assert text.endswith('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
    batch = tok(['a', 'a b c'], padding=True, return_tensors='pt')
    assert batch.input_ids[0, 0].item() == tok.pad_token_id and batch.attention_mask[0].tolist() == [0, 0, 1]
