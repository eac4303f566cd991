"""Sample the same prompts as `tests/test_sampling.py` expects, under `accelerate launch` or plain python.

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/sample_dist.py OUT_DIR   (CPU processes on a machine without GPUs)
    python tests/scripts/sample_dist.py OUT_DIR

Every process writes OUT_DIR/rank<r>.json (its rank, the world size, the batches it generated and the
records it got back); the records must be the same on every process and for any number of processes."""
import json, sys
from pathlib import Path
from cream_nb.core.config import SamplingConfig
from cream_nb.models.loading import load_model
from cream_nb.stages import sampling
from cream_nb.core.processes import process_state
from cream_nb.models.engine import HFEngine

QUESTIONS = ['Name a colour.', 'What is the capital of France, the country in Europe west of Germany?', 'Hi',
             'Explain photosynthesis in one sentence, please.', 'Why is the sky blue?']

def main(out:Path):
    state = process_state()
    model, tok = load_model('tiny', device=state.device)
    prompts = [{'id': f'q{i}', 'messages': [{'role': 'user', 'content': q}]} for i, q in enumerate(QUESTIONS)]
    done = []                                  # seeds of the batches this process generated
    orig = HFEngine._generate_batch
    def spy(self, prompt_ids, params, seed):
        done.append(seed); return orig(self, prompt_ids, params, seed)
    HFEngine._generate_batch = spy
    cfg = SamplingConfig(n_responses=3, max_new_tokens=6, batch_size=2, seed=11)
    records = sampling.sample_responses(model, tok, prompts, cfg, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    (out/f'rank{state.process_index}.json').write_text(json.dumps(
        {'rank': state.process_index, 'world_size': state.num_processes, 'batch_seeds': done, 'records': records}))

if __name__ == '__main__': main(Path(sys.argv[1]))
