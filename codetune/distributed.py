"""One process of a multi-process training, as torch.distributed.run starts it (training.launch_processes).

    python -m torch.distributed.run --standalone --nproc-per-node=N -m codetune.distributed CONFIG DATA RUN_DIR

The caller has claimed and locked RUN_DIR; each process trains it with the Trainer, which sees the
launcher's environment and runs DDP; only rank 0 writes.
"""

import logging
import sys

from codetune.config import load_config
from codetune.data import PreparedData
from codetune.rundir import RunDir
from codetune.training import train_locked


def main(config: str, data_directory: str, run_dir: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("codetune").setLevel(logging.INFO)
    train_locked(load_config(config), PreparedData.open(data_directory), RunDir(run_dir))


if __name__ == "__main__":
    main(*sys.argv[1:])
