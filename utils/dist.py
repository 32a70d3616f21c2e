"""Process placement under a launcher (torchrun / accelerate launch), GPU choice, and the one
sharding helper every frozen-model pass uses."""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, MutableMapping, Sequence, TypeVar

import torch
import torch.distributed as dist

from utils.cli import resolve_device
from utils.errors import UserError, _last_line, first_line
from utils.io import repair_tail

T = TypeVar("T")
log = logging.getLogger(__name__)

VISIBLE = "CUDA_VISIBLE_DEVICES"


def distributed_rank() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` as set by torchrun / accelerate launch."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def training_device(gpu: int | None) -> torch.device:
    """This process's device: its local rank's GPU under a launcher, else ``--gpu`` or the CPU."""
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
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------- sharded frozen passes
# Every pass of a frozen model (stage 1's evaluation, stage 2's features and teacher logits,
# stage 3's VLM answers, stage 0's local VLM, predict.py) runs the same way under a launcher:
# each rank takes one contiguous block of the items, the blocks are gathered in rank order, so
# the result is the one-process result in the one-process order.

# A process may wait for hours on the others (a long share of a pass, rank 0's writing).
PROCESS_GROUP_TIMEOUT = timedelta(hours=12)


def init_distributed() -> tuple[int, int]:
    """``(rank, world_size)``; joins the launcher's process group (gloo, unless one exists already:
    only small CPU objects are gathered)."""
    rank, _, world = distributed_rank()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return rank, world


def is_main_process() -> bool:
    return distributed_rank()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_range(count: int, rank: int, world: int, unit: int = 1) -> range:
    """Rank ``rank``'s contiguous block of ``range(count)``, made of whole ``unit``s (batches):
    the units are dealt out evenly, the first ranks getting one more where they do not divide."""
    units = -(-count // unit)
    base, extra = divmod(units, world)
    start = rank * base + min(rank, extra)
    return range(min(start * unit, count), min((start + base + (rank < extra)) * unit, count))


def concat_parts(parts: Sequence):
    """Per-rank results joined in order: tensors along dim 0, lists, dicts and dataclasses of
    those field by field; ints are summed. None parts (ranks without items) are left out."""
    parts = [part for part in parts if part is not None]  # None: a rank without items
    if not parts:
        return None
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts))
    if isinstance(first, list):
        return [item for part in parts for item in part]
    if isinstance(first, int):
        return sum(parts)
    if isinstance(first, dict):
        return {key: concat_parts([part[key] for part in parts]) for key in first}
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: concat_parts([getattr(part, f.name) for part in parts])
                              for f in dataclasses.fields(first)})
    raise TypeError(f"cannot join results of type {type(first).__name__}")


def shard_map(count: int, compute: Callable[..., T], *data, unit: int = 1) -> T:
    """``compute(block, *data)`` on this rank's block of ``range(count)``; every rank's result joined
    in rank order (:func:`concat_parts`): the one-process result, on every rank.

    ``compute`` is a named function and ``data`` what it needs beside the block (the model, the
    samples, ...), passed explicitly.

    Blocks are whole multiples of ``unit``: pass the batch size, so that every rank runs exactly
    the batches one process would run (a batched forward pass is not bit-identical across batch
    sizes, so other blocks could change the last digits).

    Without a launcher this is ``compute(range(count), *data)``. Under one, a rank that fails (a
    UserError, or any exception: its traceback is printed there) does not leave the others
    waiting: the failure is gathered like a result, every rank leaves the process group, rank 0
    raises one UserError naming the failed rank and its message (exit code 2), and the other
    ranks exit without a word, so the run ends with one ``error:`` line and nothing half-built saved.
    """
    rank, world = init_distributed()
    block = shard_range(count, rank, world, unit)
    if world == 1:
        return concat_parts([compute(block, *data)])
    if rank == 0:
        log.info("%d items sharded over %d processes (%d-%d each)", count, world,
                 len(shard_range(count, world - 1, world, unit)), len(block))

    part, failure = None, None
    try:
        part = compute(block, *data) if len(block) else None  # more ranks than items
    except UserError as err:
        failure = _last_line(str(err))
    except Exception as err:  # noqa: BLE001 - reported by rank 0; the traceback stays on this rank's stderr
        traceback.print_exc()
        failure = f"{err.__class__.__name__}: {first_line(err)}"
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (failure, part))
    failed = [(r, message) for r, (message, _) in enumerate(gathered) if message is not None]
    if failed:
        leave_process_group()
        if rank != 0:  # exit quietly and successfully: the launcher stops everyone at a failed exit,
            raise SystemExit(0)  # and rank 0 has yet to report, save what is complete and exit with 2
        first_rank, message = failed[0]
        raise UserError(f"rank {first_rank} of {world} failed on its share of {count}: {message}")
    return concat_parts([result for _, result in gathered])


# ---------------------------------------------------------------- data-parallel training
# Stage 2's teacher trains on every process (engine.distill.train_teacher): the same weights on
# each, the gradients of each step summed across them, the same optimiser step everywhere.

_GRADIENT_GROUPS: dict[str, object] = {}


def gradient_group(device: torch.device):
    """The process group the teacher's gradients are summed over: NCCL's on CUDA (where available),
    else the launcher's gloo group (None). Every process must call it (a collective)."""
    device = torch.device(device)
    if device.type != "cuda" or not dist.is_nccl_available():
        return None
    if "nccl" not in _GRADIENT_GROUPS:
        torch.cuda.set_device(device)
        _GRADIENT_GROUPS["nccl"] = dist.new_group(backend="nccl")
    return _GRADIENT_GROUPS["nccl"]


def broadcast_state(model: torch.nn.Module, group=None) -> None:
    """Every process's ``model`` set to rank 0's weights and buffers (in place)."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0, group=group)


def sum_gradients(parameters, group=None) -> None:
    """Replace each parameter's gradient by its sum over the processes, in one flat all-reduce.

    A process without a gradient for a parameter (no images in its share this step) adds zeros;
    a parameter no process has a gradient for keeps None, so the optimiser skips it as one process
    would."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    reference = next((p.grad for p in params if p.grad is not None), params[0])
    flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None
                        else torch.zeros(p.numel(), dtype=reference.dtype, device=reference.device) for p in params),
                      torch.tensor([float(p.grad is not None) for p in params], dtype=reference.dtype,
                                   device=reference.device)])
    dist.all_reduce(flat, group=group)
    present = flat[-len(params):].tolist()
    offset = 0
    for param, has in zip(params, present):
        count = param.numel()
        param.grad = flat[offset:offset + count].view_as(param) if has else None
        offset += count


def all_sum(*values: float) -> list[float]:
    """Each value summed over the processes (float64, over the launcher's gloo group): every
    process gets the same sums. Without a launcher, the values as they are."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(totals)
    return totals.tolist()


# ---------------------------------------------------------------- per-rank part files

def part_file(path: str | Path, rank: int) -> Path:
    """Where rank ``rank`` appends the lines it produces for ``path``: ``<path>.part<rank>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.part{rank}")


def merge_part_files(path: str | Path) -> int:
    """Append the complete lines of ``path``'s part files to ``path`` in rank order, then delete
    them; an unfinished last line (a killed rank) is dropped. Returns the number of lines moved.

    Called by rank 0 at the end of a sharded run and at the start of the next one (which picks
    up what a killed run left in its part files), so resuming works as after a single process.
    """
    path = Path(path)
    found = {int(p.name.rsplit(".part", 1)[1]): p for p in path.parent.glob(f"{glob.escape(path.name)}.part*")
             if p.name.rsplit(".part", 1)[1].isdigit()}
    parts = [found[rank] for rank in sorted(found)]
    moved = 0
    repair_tail(path)
    for part in parts:
        data = part.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if complete:
            with open(path, "ab") as fh:
                fh.write(complete)
                fh.flush()
                os.fsync(fh.fileno())
            moved += complete.count(b"\n")
        part.unlink()
    return moved
