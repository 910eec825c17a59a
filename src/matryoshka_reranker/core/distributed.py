"""Sharing one stage's work among the worker processes ``distributed.processes`` starts.

Training uses the HF Trainer's own data parallelism; teacher scoring and evaluation split their
shards by worker rank (``RANK`` / ``WORLD_SIZE``, set by torch.distributed.run), wait for each other
with a gloo barrier, and let worker 0 merge. One process is simply rank 0 of 1.
"""

from __future__ import annotations

import datetime
import os

# What torch.distributed.run (and our 1-process stand-in, training/trainer.py) sets for each worker.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# ... and what accelerate / transformers leave in os.environ after a DeepSpeed run in this process
# (a child process that inherits them takes a different, broken, DeepSpeed init path).
TRAINING_STATE_VARS = LAUNCHER_VARS + ("LOCAL_WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED")


def rank_and_world() -> tuple[int, int]:
    """This worker's rank and the number of workers ((0, 1) without a launcher)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier() -> None:
    """Waits for every worker (gloo works on CPU and GPU machines alike)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    dist.barrier()
