"""Stage 2's teacher, data-parallel (engine.distill.train_teacher): how each global batch is split
across the processes, the per-image augmentation seeds that make an image's crop independent of
the process loading it, the gradient sum, the loader's settings, the log line and
``--teacher_precision``. The 2-process run itself equals the 1-process one in
tests/test_scale_out.py (gloo, CPU)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine.distill import (GlobalBatches, SeededAugmentation, collate_share, describe_teacher_training,
                            teacher_epoch, teacher_loader_options)

pytestmark = pytest.mark.usefixtures("one_thread")


def shares(count: int, batch_size: int, world: int, seed: int = 0, epoch: int = 1) -> list[list[list[tuple]]]:
    """Per rank, its shares of the epoch's global batches."""
    samplers = [GlobalBatches(count, batch_size, seed, rank, world) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(sampler) for sampler in samplers]


def test_each_global_batch_is_split_across_the_ranks_in_one_order():
    one = shares(21, 10, 1)[0]
    assert [len(batch) for batch in one] == [10, 10, 1]  # the last batch partial, as a DataLoader's
    assert sorted(index for batch in one for index, _ in batch) == list(range(21))
    for world, expected in ((2, [[5, 5], [5, 5], [1, 0]]), (3, [[4, 3, 3], [4, 3, 3], [1, 0, 0]])):
        per_rank = shares(21, 10, world)
        assert all(len(ranks) == 3 for ranks in per_rank)  # every rank takes every step, even with no images
        assert [[len(per_rank[rank][step]) for rank in range(world)] for step in range(3)] == expected
        for step in range(3):  # the ranks' shares, in rank order, are the one-process batch
            assert [row for rank in range(world) for row in per_rank[rank][step]] == one[step]
    sampler = GlobalBatches(21, 10, 0, 1, 3)
    assert sampler.global_sizes() == [10, 10, 1] and len(sampler) == 3 and sampler.batch_size == 10
    # A new order each epoch, the same for the same seed and epoch; another seed another order.
    assert shares(21, 10, 1, epoch=2) != one and shares(21, 10, 1, epoch=1) == [one]
    assert shares(21, 10, 1, seed=1) != [one]


class Noise:
    """A dataset whose item is random noise drawn from both generators a transform may use."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.tensor([index, random.random(), torch.rand(()).item()]), index


def test_an_images_augmentation_comes_from_its_own_seed_not_the_process():
    data = SeededAugmentation(Noise())
    random.seed(1)
    torch.manual_seed(1)
    first = data[(2, 123)][0]
    state = (random.getstate(), torch.get_rng_state())
    random.seed(2)
    torch.manual_seed(2)  # another process, another worker: other global generator states
    assert torch.equal(data[(2, 123)][0], first)
    assert not torch.equal(data[(2, 124)][0], first)
    random.seed(1)
    torch.manual_seed(1)
    data[(2, 123)]
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])  # left as they were
    assert data[3][0][0] == 3  # a plain index loads as the dataset does
    assert collate_share([]) is None  # a rank without images this step


def test_gradients_are_summed_and_one_nobody_has_stays_none(tmp_path):
    from utils.dist import sum_gradients

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
        (used * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
        sum_gradients([used, unused])
        assert used.grad.tolist() == [1.0, 2.0, 3.0]
        assert unused.grad is None  # Adam skips it, as in one process (zeros would decay it)
    finally:
        dist.destroy_process_group()


def test_the_loader_pins_memory_for_a_gpu_and_keeps_its_workers():
    assert teacher_loader_options(torch.device("cuda", 0), 4) == {"num_workers": 4, "pin_memory": True,
                                                                 "persistent_workers": True}
    assert teacher_loader_options(torch.device("cpu"), 0) == {"num_workers": 0, "pin_memory": False,
                                                             "persistent_workers": False}


def test_the_log_says_how_the_teacher_trains():
    assert describe_teacher_training(1, 10, "fp32") == "teacher: one process, batch 10, fp32"
    assert describe_teacher_training(2, 10, "bf16") == \
        "teacher: data-parallel over 2 processes, global batch 10 (5+5 per step), bf16"
    assert describe_teacher_training(3, 10, "fp32") == \
        "teacher: data-parallel over 3 processes, global batch 10 (4+3+3 per step), fp32"


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_teacher_precision_runs_the_forward_pass_in_that_dtype(precision, dtype):
    """bf16: the forward pass under autocast (on the CPU here), the weights and their steps in fp32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    seen = []
    model[1].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0]))]
    result = teacher_epoch(model, batches, optimizer, torch.device("cpu"), 1, 1, precision=precision)
    assert seen == [dtype] and model[1].weight.dtype == torch.float32 and result["train_loss"] > 0
    with pytest.raises(ValueError):
        teacher_epoch(model, batches, optimizer, torch.device("cpu"), 1, 1, precision="fp16")
