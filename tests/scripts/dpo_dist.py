"""CREAM DPO under `accelerate launch`: every process trains the tiny model's LoRA adapter on the same pairs
and writes its final trainable weights and what it saw to OUT_DIR, for tests/test_dpo.py to compare.

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 tests/scripts/dpo_dist.py OUT_DIR 2
    python tests/scripts/dpo_dist.py OUT_DIR 4       # one process with the same global batch (4 pairs per step)
"""
import json, sys
from pathlib import Path
import torch
from datasets import Dataset
from safetensors.torch import save_file
from cream_nb.core.config import DPOConfig, ModelConfig
from cream_nb.stages.dpo import train_dpo
from cream_nb.models.loading import add_adapter, load_model
from cream_nb.models.logprobs import sequence_logps

QUESTIONS = ['What is 2 + 2?', 'Name a primary colour.', 'Why is the sky blue?', 'What do bees make?',
             'Is iron heavier than feathers?', 'Say hello.', 'What is the capital of France?', 'Count to three.']
CHOSEN = ['It is 4.', 'Blue.', 'Rayleigh scattering of sunlight.', 'Honey.', 'Not per kilo.', 'Hello!', 'Paris.', 'One, two, three.']
REJECTED = ['Five', 'Loud.', 'Because.', 'Cars.', 'Yes always', 'Bye', 'Berlin', 'Three two one']

def pairs_for(model, tokenizer) -> Dataset:
    "Eight pairs with per-prompt rates and reference log-probs of `model` (the policy before training)."
    prompts = [[{'role': 'user', 'content': q}] for q in QUESTIONS]
    ref, _ = sequence_logps(model, tokenizer, prompts * 2, CHOSEN + REJECTED, batch_size=16)
    n = len(QUESTIONS)
    return Dataset.from_dict(dict(prompt_id=[f'q{i}' for i in range(n)], prompt=prompts, chosen=CHOSEN, rejected=REJECTED,
                                  prompt_consistency=[0.9, 0.8, 0.7, 0.6, 1.0, 0.95, 0.85, 0.75], set_consistency=[0.82] * n,
                                  ref_chosen_logps=ref[:n].tolist(), ref_rejected_logps=ref[n:].tolist()))

def main(out:Path, batch_size:int):
    torch.manual_seed(0)
    model, tokenizer = load_model('tiny', device='cpu')
    pm = add_adapter(model, 'm1', ModelConfig(lora_r=4, lora_alpha=8))
    pm.eval()
    pairs = pairs_for(pm, tokenizer)
    init = {n: p.detach().clone().contiguous() for n, p in pm.named_parameters() if p.requires_grad}
    cfg = DPOConfig(learning_rate=1e-2, batch_size=batch_size, epochs=1, warmup_ratio=0.0, max_length=256)
    metrics = train_dpo(pm, tokenizer, pairs, cfg, out/'model', consistency='dyn', seed=0, progress=False)
    from accelerate import PartialState
    state = PartialState()
    final = {n: p.detach().clone().contiguous() for n, p in pm.named_parameters() if n in init}
    save_file(final, str(out/f'rank{state.process_index}.safetensors'))
    if state.is_main_process: save_file(init, str(out/'init.safetensors'))
    (out/f'rank{state.process_index}.json').write_text(json.dumps(dict(
        process_index=state.process_index, num_processes=state.num_processes, distributed_type=str(state.distributed_type),
        steps=metrics['steps'], history=metrics['history'], processes=metrics['processes'], loss_first=metrics['loss_first'], loss_last=metrics['loss_last'])))

if __name__ == '__main__':
    main(Path(sys.argv[1]), int(sys.argv[2]))
