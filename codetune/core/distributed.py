"""Training in several processes: the launch (torch.distributed.run) and which process is which.

    python -m torch.distributed.run --standalone --nproc-per-node=N -m codetune.training_process CONFIG DATA RUN_DIR

The caller has claimed and locked RUN_DIR; each process runs train_model in it (training_process.py), whose Trainer
sees the launcher's environment and runs DDP; only rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from codetune.core.config import Config
from codetune.core.config.loader import to_yaml
from codetune.core.data import PreparedData
from codetune.core.errors import TrainingProcessLost
from codetune.core.files import write_atomic
from codetune.core.rundir import CHECKPOINTS, RunDir

log = logging.getLogger(__name__)


def processes(cfg: Config) -> int:
    return cfg.training.num_processes or max(torch.cuda.device_count(), 1)


def launched() -> bool:
    """Whether this is one of the processes torch.distributed.run started."""
    return "LOCAL_RANK" in os.environ


def rank_zero() -> bool:
    """The process that writes: checkpoints (the Trainer's rule), the adapter, the export and the records."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_processes(cfg: Config, data: PreparedData, run: RunDir) -> None:
    """Train in processes(cfg) processes with torch.distributed.run, their output in this process's log.

    The launcher runs inside the caller (the train task keeps its retries and timeout); the processes
    train the run directory this caller has claimed and locked. One that dies fails them all, and
    TrainingProcessLost tells the task to try again, resuming from the newest complete checkpoint.
    """
    n = processes(cfg)
    settings = run / ".launch-config.yaml"
    write_atomic(settings, to_yaml(cfg))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    command += ["-m", "codetune.core.training_process", str(settings), data.directory, str(run.path)]
    log.info("training in %d processes (%s)", n, "nccl" if torch.cuda.is_available() else "gloo")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as launcher:
        for line in launcher.stdout:
            log.info("%s", line.rstrip())
    if launcher.returncode != 0:
        raise TrainingProcessLost(
            f"a training process failed (torch.distributed.run exited with {launcher.returncode}; its output is above)"
            f"; checkpoints are kept in {run / CHECKPOINTS} and the next try resumes from the newest"
        )
