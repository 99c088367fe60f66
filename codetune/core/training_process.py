"""What each process of a multi-process training runs (distributed.launch_processes starts them):

python -m torch.distributed.run --standalone --nproc-per-node=N -m codetune.core.training_process CONFIG DATA RUN_DIR
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from codetune.core.config.loader import load_config
from codetune.core.data import PreparedData
from codetune.core.distributed import rank_zero
from codetune.core.families import family_of
from codetune.core.rundir import RunDir
from codetune.core.training import train_model


def main(config: str, data_directory: str, run_dir: str) -> None:
    # Each line reaches the launching task's log, which adds time and level: the rank is what it lacks.
    rank = os.environ["RANK"]
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(levelname)s %(message)s")
    logging.getLogger("codetune").setLevel(logging.INFO if rank_zero() else logging.WARNING)
    cfg, data = load_config(config), PreparedData.open(data_directory)
    if RunDir.of(cfg, data).path != Path(run_dir):
        raise RuntimeError(f"the launched configuration names another run than {run_dir}: {RunDir.of(cfg, data)}")
    train_model(cfg, data, family_of(cfg.model))


if __name__ == "__main__":
    main(*sys.argv[1:])
