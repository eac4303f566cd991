"""cream_nb.core.processes under `accelerate launch`: each process writes what it computed and what it received.

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 tests/scripts/processes_dist.py OUT_DIR
"""
import json, sys
from pathlib import Path
from cream_nb.core.artifacts import reading_only, write_json
from cream_nb.core.processes import barrier, finish, from_writer, gathered, is_writer, my_share, rank, shared_batches, world_size

out = Path(sys.argv[1])
computed = []
def work(batch):
    computed.append(batch)
    return [x * x for x in batch]
res = shared_batches([[1, 2], [3], [4, 5], [6], [7]], work)
with reading_only(not is_writer()):          # only the main process's file reaches the disk
    write_json({'writer_rank': rank()}, out/'written.json')
barrier()
(out/f'rank{rank()}.json').write_text(json.dumps(dict(
    world=world_size(), rank=rank(), writer=is_writer(), share=my_share(5), computed=computed, result=res,
    decided=from_writer(f'decided by rank {rank()}'), gathered=gathered([rank()] * (rank() + 1)),
    seen_written=json.loads((out/'written.json').read_text()))))
finish()
