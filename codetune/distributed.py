"""One process of a multi-process training, as torch.distributed.run starts it (training.launch_processes).

    python -m torch.distributed.run --standalone --nproc-per-node=N -m codetune.distributed CONFIG DATA RUN_DIR

The caller has claimed and locked RUN_DIR; each process trains it with the Trainer, which sees the
launcher's environment and runs DDP; only rank 0 writes.
"""

import logging
import os
import sys

from codetune.config import load_config
from codetune.data import PreparedData
from codetune.rundir import RunDir
from codetune.training import rank_zero, train_locked


def main(config: str, data_directory: str, run_dir: str) -> None:
    # Each line reaches the launching task's log, which adds time and level: the rank is what it lacks.
    rank = os.environ["RANK"]
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    logging.getLogger("codetune").setLevel(logging.INFO if rank_zero() else logging.WARNING)
    train_locked(load_config(config), PreparedData.open(data_directory), RunDir(run_dir))


if __name__ == "__main__":
    main(*sys.argv[1:])
