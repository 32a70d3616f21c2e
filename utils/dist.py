"""Process placement: ranks under a launcher (torchrun / accelerate launch) and GPU choice."""
from __future__ import annotations

import os
from typing import MutableMapping

from utils.errors import UserError

VISIBLE = "CUDA_VISIBLE_DEVICES"


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` as set by torchrun / accelerate launch."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def training_device(gpu: int | None) -> "torch.device":  # noqa: F821
    """This process's device: its local rank's GPU under a launcher, else ``--gpu`` or the CPU."""
    import torch

    from utils.cli import resolve_device

    _, local_rank, world_size = distributed_rank()
    if world_size > 1 and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return resolve_device(gpu)


def single_gpu_visibility(gpu: int | None, visible: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value exposing only GPU ``gpu`` (default 0) of those the
    current value (None: all) exposes."""
    index = 0 if gpu is None else gpu
    if visible is None:
        return str(index)
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    if index >= len(ids):
        raise UserError(f"--gpu {gpu}: {VISIBLE}={visible} exposes only {len(ids)} device(s)")
    return ids[index]


def pin_single_gpu(gpu: int | None, environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Outside a launcher, let this process see one GPU only; return the ``--gpu`` to use now.

    The transformers Trainer puts a single process on cuda:0 and wraps the model in
    DataParallel over every visible GPU, whatever ``--gpu`` says; with only the chosen GPU
    visible, cuda:0 *is* that GPU. Must run before CUDA is initialised: ``device_count`` asks
    NVML, which leaves the visible set open (where NVML is missing the set is fixed by then,
    and the Trainer's placement check reports the problem).
    """
    import torch

    if distributed_rank()[2] > 1 or torch.cuda.is_initialized():
        return gpu
    count = torch.cuda.device_count()
    if count <= 1:  # nothing to hide; resolve_device reports a wrong --gpu
        return gpu
    if gpu is not None and gpu >= count:
        raise UserError(f"--gpu {gpu}: only {count} CUDA device(s) visible")
    environ[VISIBLE] = single_gpu_visibility(gpu, environ.get(VISIBLE))
    return None if gpu is None else 0


def leave_process_group() -> None:
    """Wait for every process, then tear the launcher's process group down.

    Call on every rank once the collective work is over, before the helper ranks return: a
    process that exits with its gloo group still alive can abort in the group's destructor
    ("terminate called without an active exception") while the others are still running.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
