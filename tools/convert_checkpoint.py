"""
A sharded checkpoint (train.py --parallel=fsdp: a directory of torch.distributed.checkpoint
shards and run.pt) as one ckpt.pt file, the form a single-process run writes: weights, AdamW's
state and the run's state. Every script reads sharded directories as they are (nanowso/checkpoint.py's
load_checkpoint gathers them); this writes the file once, for a copy elsewhere or for tools
that expect one file. It runs as one process, without a GPU.

    python tools/convert_checkpoint.py out/ckpt_sharded out/ckpt.pt
"""

import os
import sys
from pathlib import Path

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanowso.checkpoint import save_checkpoint
from nanowso.parallel import is_sharded, to_single_file


def main(argv):
    if len(argv) != 2 or argv[0] in ("-h", "--help"):
        raise SystemExit(__doc__.strip() if argv[:1] in (["-h"], ["--help"]) else
                         "usage: python tools/convert_checkpoint.py <sharded checkpoint directory> <out ckpt.pt>")
    source, out = argv
    if not is_sharded(source):
        raise SystemExit(f"error: {source} is not a sharded checkpoint (a directory with .metadata, written by "
                         f"train.py --parallel=fsdp)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    state = to_single_file(source)
    save_checkpoint(out, state)
    print(f"wrote {out}: step {state['step']}, {len(state['model'])} weight tensors"
          f"{', with AdamW state' if 'optimizer' in state else ' (weights only)'}")


if __name__ == "__main__":
    main(sys.argv[1:])
