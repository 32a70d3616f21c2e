"""The distillation head: a small MLP on the VLM's mean-pooled, frozen visual features, the
distillation loss it is trained with, its logits over cached features (:func:`head_logits`), and
its checkpoint ``head.pt`` (:func:`save_head` writes it, :func:`load_head` reads it back).
:class:`HeadEnsemble` trains several heads (a sweep's settings) as one module, their weights
stacked, each drawing its dropout masks from its own generator (:class:`DropoutMasks`)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils.checkpoints import file_id, read_checkpoint, stamp
from utils.errors import UserError
from utils.io import torch_save
from utils.records import DistillRecord

HIDDEN_WIDTHS = (1024, 512, 256, 128, 64)
# The paper's head: dropout 0.1 after each hidden layer's GELU. Built in, not a flag; the one
# default of DistillHead and engine.distill.train_head (tests/test_settings_reach.py checks it).
HEAD_DROPOUT = 0.1
HEAD_FILE = "head.pt"


class DistillHead(nn.Module):
    """``in_dim -> [1024, 512, 256, 128, 64][:depth] -> num_classes`` with GELU and dropout.

    ``feature_mean``/``feature_std`` are saved buffers applied to the input first, so whoever
    loads the head (stage 3, the demo) feeds it raw pooled features. They stay 0/1 (identity,
    the paper's setting) unless the features were standardised in training.
    """

    def __init__(self, in_dim: int, num_classes: int, depth: int = 1, dropout: float = HEAD_DROPOUT):
        super().__init__()
        if not 0 <= depth <= len(HIDDEN_WIDTHS):
            raise ValueError(f"depth must be between 0 and {len(HIDDEN_WIDTHS)}, got {depth}")
        self.in_dim, self.num_classes, self.depth, self.dropout = in_dim, num_classes, depth, dropout
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))
        layers, width = [], in_dim
        for hidden in HIDDEN_WIDTHS[:depth]:
            layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)

    def set_standardization(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        """Standardise inputs with the per-dimension mean and std of ``features`` (N, in_dim)."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(eps))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.feature_mean) / self.feature_std)

    def config(self) -> dict:
        """Constructor arguments, saved in the checkpoint so the head rebuilds without this script."""
        return {"in_dim": self.in_dim, "num_classes": self.num_classes, "depth": self.depth,
                "dropout": self.dropout}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      alpha: float | Sequence[float], temperature: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)``.

    KL is averaged over the batch; T^2 keeps the soft-target gradients on the scale of the CE term.
    Logits (B, C) and targets (B,) give one loss. Logits (E, B, C) and targets (E, B), E heads of an
    ensemble each on its own batch, with one alpha per head, give one loss per head (E,): each
    computed with the very roundings of the (B, C) form, whatever E (so, with the gradients, an
    ensemble's member trains exactly as the head alone).
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    if student_logits.dim() == 3:
        kd = F.kl_div(_per_member(log_student), _per_member(log_teacher), reduction="none",
                      log_target=True).sum(dim=1) / student_logits.shape[1]
        ce = member_cross_entropy(student_logits, targets)
        alpha = _PerMember(tuple(float(value) for value in alpha))
    else:
        kd = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        ce = F.cross_entropy(student_logits, targets)
    return alpha * temperature ** 2 * kd + (1 - alpha) * ce


class _PerMember:
    """One number per member in the loss's arithmetic: products and differences with numbers are
    taken in double, per member, as Python takes them for a lone head's float alpha, and a product
    with a tensor (E,) multiplies each member's entry by its number rounded to the tensor's dtype,
    as a float times a tensor does."""

    def __init__(self, values: tuple[float, ...]):
        self.values = values

    def __mul__(self, other):
        if isinstance(other, torch.Tensor):
            return _member_numbers(self.values, other.dtype, other.device) * other
        return _PerMember(tuple(value * other for value in self.values))

    def __rsub__(self, other: float) -> "_PerMember":
        return _PerMember(tuple(other - value for value in self.values))


@functools.lru_cache(maxsize=64)
def _member_numbers(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)  # made once per sweep, not per step


def _per_member(values: torch.Tensor) -> torch.Tensor:
    """(E, B, C) as (E, B * C) rows that elementwise kernels cannot merge into one run (a padded
    copy): each member's row is then vectorised as its own (B, C) tensor would be, so exp and
    log round alike whatever E."""
    flat = values.reshape(len(values), -1)
    return F.pad(flat, (0, 1))[:, :flat.shape[1]]


def member_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's ``F.cross_entropy(logits[i], targets[i])``, (E,), for logits (E, B, C) and
    targets (E, B), rounding exactly as on its own (the gates of an ensemble)."""
    return _nll_mean(F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1))


_NLL_LEVELS = 8  # torch's nll_loss sums a batch in this many cascaded levels


def _nll_mean(picked: torch.Tensor) -> torch.Tensor:
    """``-picked.mean(1)`` for (E, B) target log-probabilities, summed in the order of torch's
    ``nll_loss`` (reduction "mean") on each member's (B, C) batch, which rounds otherwise than a
    reduction over dim 1: one vector operation per row of the batch."""
    rows = picked.shape[1]
    power = max(4, (rows - 1).bit_length() // _NLL_LEVELS)
    mask = (1 << power) - 1
    levels: list[torch.Tensor | None] = [None] * _NLL_LEVELS
    for row in range(rows):
        levels[0] = -picked[:, row] if levels[0] is None else levels[0] - picked[:, row]
        for level in range(_NLL_LEVELS - 1):
            if row & (mask << (level * power)):
                break
            if levels[level] is not None:
                above = levels[level + 1]
                levels[level + 1] = levels[level] if above is None else above + levels[level]
                levels[level] = None
    total = None
    for level in levels:
        if level is not None:
            total = level if total is None else total + level
    return total / float(rows)


# torch.bmm multiplies small products (batch rows x in x out below this) with its own loop, which
# rounds otherwise than F.linear; those layers of an ensemble run member by member instead.
_BMM_OWN_LOOP = 400


class _StackedLinear(torch.autograd.Function):
    """``F.linear`` of each member on its own rows, (n, B, in) -> (n, B, out), one batched product
    per pass, each member's numbers rounding as its lone ``F.linear`` (addmm) would: the weight's
    gradient is computed as addmm's backward computes it for a transposed weight (grad^T @ input,
    not input^T @ grad, which rounds otherwise). That gradient is written into ``buffer``, kept
    from step to step, and set as the weight's ``.grad`` (not accumulated: one backward pass per
    step): a stack of wide layers (27 x 1024 x 3,584 floats) would otherwise be allocated, and its
    pages faulted in, anew at every step."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.weight, ctx.buffer = weight, buffer
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad_h = grad.bmm(weight) if ctx.needs_input_grad[0] else None
        ctx.weight.grad = torch.bmm(grad.transpose(1, 2), h, out=ctx.buffer)
        return grad_h, None, grad.sum(dim=1), None


def _stacked_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    buffer: torch.Tensor) -> torch.Tensor:
    """Each member's ``F.linear(h[i], weight[i], bias[i])``, (n, B, out), with its roundings;
    ``buffer`` (like ``weight``) receives the weight's gradient."""
    if h.shape[1] * h.shape[2] * weight.shape[1] < _BMM_OWN_LOOP:
        return torch.stack([F.linear(h[i], _row(weight, i), _row(bias, i)) for i in range(len(h))])
    return _StackedLinear.apply(h, weight, bias, buffer)


def _row(stacked: torch.Tensor, index: int) -> torch.Tensor:
    """One member's slice of a stacked parameter; a view without a copy in the backward pass when the
    stack holds one member (a single run trains exactly as a lone DistillHead)."""
    return stacked.view(stacked.shape[1:]) if len(stacked) == 1 else stacked[index]


class HeadEnsemble(nn.Module):
    """Distillation heads of any depths and settings trained as one module, deepest first.

    Hidden layer ``k`` (width ``HIDDEN_WIDTHS[k]``) of every member deeper than ``k`` is one stacked
    weight (members, out, in), so one batched matrix product runs that layer of all of them; the
    output layers are stacked per depth. Each member keeps its own standardisation buffers and sees
    its own rows (``forward`` takes (E, B, in_dim)); every member's numbers round as a lone head's
    would, whatever E, so an ensemble of one is a single run and a member of a sweep equals it.
    :meth:`forward_member` runs one member for validation, :meth:`member_state` is a member's
    ``DistillHead`` state dict. Dropout masks are given per step (:class:`DropoutMasks`).
    """

    def __init__(self, heads: Sequence[DistillHead]):
        super().__init__()
        if not heads:
            raise ValueError("an ensemble needs at least one head")
        self.depths = [head.depth for head in heads]
        if self.depths != sorted(self.depths, reverse=True):
            raise ValueError(f"members must come deepest first, got depths {self.depths}")
        first = heads[0]
        if any(head.config() | {"depth": 0} != first.config() | {"depth": 0} for head in heads):
            raise ValueError("every member must have the same input width, classes and dropout")
        self.in_dim, self.num_classes, self.dropout = first.in_dim, first.num_classes, first.dropout
        # counts[k]: the members with a hidden layer k (a prefix: deepest first).
        self.counts = [sum(depth > k for depth in self.depths) for k in range(self.depths[0])]
        self.hidden_weight = nn.ParameterList(
            nn.Parameter(torch.stack([head.mlp[3 * k].weight.detach() for head in heads[:count]]))
            for k, count in enumerate(self.counts))
        self.hidden_bias = nn.ParameterList(
            nn.Parameter(torch.stack([head.mlp[3 * k].bias.detach() for head in heads[:count]]))
            for k, count in enumerate(self.counts))
        # The members of one depth are a contiguous block; their output layers are stacked per depth.
        self.blocks = {depth: (self.depths.index(depth), self.depths.count(depth)) for depth in set(self.depths)}
        self.out_weight = nn.ParameterDict({str(depth): nn.Parameter(torch.stack(
            [head.mlp[-1].weight.detach() for head in heads[start:start + size]]))
            for depth, (start, size) in self.blocks.items()})
        self.out_bias = nn.ParameterDict({str(depth): nn.Parameter(torch.stack(
            [head.mlp[-1].bias.detach() for head in heads[start:start + size]]))
            for depth, (start, size) in self.blocks.items()})
        self.register_buffer("feature_mean", torch.stack([head.feature_mean for head in heads]))
        self.register_buffer("feature_std", torch.stack([head.feature_std for head in heads]))
        self._grad_buffers: dict[int, torch.Tensor] = {}  # per stacked weight, its gradient's storage

    def _grad_buffer(self, weight: torch.Tensor) -> torch.Tensor:
        buffer = self._grad_buffers.get(id(weight))
        if buffer is None or buffer.device != weight.device:
            buffer = self._grad_buffers[id(weight)] = torch.empty_like(weight)
        return buffer

    def __len__(self) -> int:
        return len(self.depths)

    def member_layers(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Member ``index``'s (weight, bias) per linear layer, hidden ones first: views of the stacks."""
        depth = self.depths[index]
        start = self.blocks[depth][0]
        hidden = [(_row(self.hidden_weight[k], index), _row(self.hidden_bias[k], index)) for k in range(depth)]
        return hidden + [(_row(self.out_weight[str(depth)], index - start),
                          _row(self.out_bias[str(depth)], index - start))]

    def forward_member(self, index: int, features: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s logits (B, C) for ``features`` (B, in_dim), without dropout: the
        operations of a :class:`DistillHead` in eval mode (validation)."""
        h = (features - self.feature_mean[index]) / self.feature_std[index]
        *hidden, (weight, bias) = self.member_layers(index)
        for hidden_weight, hidden_bias in hidden:
            h = F.gelu(F.linear(h, hidden_weight, hidden_bias))
        return F.linear(h, weight, bias)

    def forward(self, features: torch.Tensor, masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Every member's logits (E, B, C) for its own rows ``features`` (E, B, in_dim); ``masks``:
        per hidden layer k the masks (counts[k], B, width) of the members deeper than k, or None.
        Each member's logits round exactly as :class:`DistillHead`'s on its rows, whatever E."""
        h = (features - self.feature_mean[:, None]) / self.feature_std[:, None]
        logits = []
        for k in range(self.depths[0] + 1):
            count = self.counts[k] if k < len(self.counts) else 0
            if k in self.blocks:  # the members of depth k end here: rows count.. of h
                weight = self.out_weight[str(k)]
                logits.append(_stacked_linear(h[count:], weight, self.out_bias[str(k)], self._grad_buffer(weight)))
            if count:
                weight = self.hidden_weight[k]
                h = F.gelu(_stacked_linear(h[:count], weight, self.hidden_bias[k], self._grad_buffer(weight)))
                if masks is not None:
                    h = h * masks[k]  # nn.Dropout's own product: input * (bernoulli(1 - p) / (1 - p))
        return torch.cat(logits[::-1])  # deepest first, as the members

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s weights as a :class:`DistillHead` state dict (CPU copies)."""
        state = {"feature_mean": self.feature_mean[index], "feature_std": self.feature_std[index]}
        layers = self.member_layers(index)
        for k, (weight, bias) in enumerate(layers):
            state[f"mlp.{3 * k}.weight"], state[f"mlp.{3 * k}.bias"] = weight, bias
        return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}

    def member(self, index: int) -> DistillHead:
        """Member ``index`` as a lone :class:`DistillHead` (CPU, eval mode)."""
        head = DistillHead(self.in_dim, self.num_classes, self.depths[index], self.dropout)
        head.load_state_dict(self.member_state(index))
        return head.eval()


class DropoutMasks:
    """The members' dropout masks, step by step, each member's from its own CPU generator.

    A lone head draws its masks from the global generator as ``nn.Dropout`` does: per step and
    hidden layer, ``bernoulli(1 - p)`` over (B, width), then scaled by 1 / (1 - p). On the CPU those
    draws take one number per element in order, so a member's masks for many steps can be drawn in
    one call and split: started from the state the global generator had after the member's
    initialisation, its generator gives exactly the masks the head trained alone gets. Drawn on the
    CPU whatever the device (the masks of a run do not depend on it), ``chunk`` floats at a time.
    """

    def __init__(self, ensemble: HeadEnsemble, generators: Sequence[torch.Generator], steps: Sequence[int],
                 device: torch.device, chunk: int = 1 << 22):
        self.p, self.counts, self.device = ensemble.dropout, ensemble.counts, device
        self.depths, self.generators, self.steps = ensemble.depths, list(generators), list(steps)
        self.chunk = chunk

    def epoch(self) -> Iterator[list[torch.Tensor] | None]:
        """Each step's masks of one epoch of ``steps`` (the rows per step), in order; None per step
        when no member has dropout."""
        if not self.counts or self.p == 0:
            yield from (None for _ in self.steps)
            return
        widths = HIDDEN_WIDTHS[:len(self.counts)]
        per_row = sum(width * count for width, count in zip(widths, self.counts))
        start = 0
        while start < len(self.steps):
            rows = self.steps[start]
            size = 1  # consecutive steps of the same size, up to `chunk` floats
            while (start + size < len(self.steps) and self.steps[start + size] == rows
                   and (size + 1) * rows * per_row <= self.chunk):
                size += 1
            buffers = [torch.empty(count, size, rows, width) for width, count in zip(widths, self.counts)]
            for member, (depth, generator) in enumerate(zip(self.depths, self.generators)):
                if depth == 0:
                    continue
                drawn = torch.empty(size, rows * sum(widths[:depth])).bernoulli_(1 - self.p, generator=generator)
                offset = 0
                for k in range(depth):  # one step draws layer 0, then layer 1, ...
                    buffers[k][member] = drawn[:, offset:offset + rows * widths[k]].view(size, rows, widths[k])
                    offset += rows * widths[k]
            buffers = [buffer.div_(1 - self.p).to(self.device) for buffer in buffers]
            for step in range(size):
                yield [buffer[:, step] for buffer in buffers]
            start += size


@torch.no_grad()
def head_logits(head: DistillHead, features: torch.Tensor) -> torch.Tensor:
    """The frozen head's logits (CPU) for cached features (N, in_dim), on the head's device."""
    head.eval()
    return head(features.to(next(head.parameters()).device)).cpu()


def save_head(path: str | Path, head: DistillHead, class_names: Sequence[str], **fields) -> Path:
    """``head.pt``: weights (standardisation buffers included), constructor arguments, class names
    and ``fields`` (``base_model``, ``teacher_id``, the encoding settings, training results)."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    return torch_save(stamp({"state_dict": state, "class_names": list(class_names), **head.config(), **fields},
                            "head"), path)


def load_head(distill_dir: str | Path, class_names: Sequence[str] | None = None,
              base_model: str | None = None, dataname: str = "<dataname>") -> tuple[DistillHead, DistillRecord]:
    """Rebuild the trained head (eval mode, CPU) from a stage-2 folder (or its ``head.pt``);
    returns ``(head, the folder's record)``.

    The folder's ``meta.json`` must fit ``class_names`` and ``base_model`` (when given) and name
    this very ``head.pt`` (``head_id``)."""
    distill_dir = Path(distill_dir)
    if distill_dir.name == HEAD_FILE:
        distill_dir = distill_dir.parent
    record = DistillRecord.load(distill_dir, dataname)
    record.check_run(distill_dir, class_names, base_model)
    path = distill_dir / HEAD_FILE
    if not path.is_file() or file_id(path) != record.head_id:
        raise UserError(f"{path}: missing or not the head meta.json describes; rerun "
                        f"`python train_distillation.py --dataname {dataname}`")
    checkpoint = read_checkpoint(path, "head", dataname)
    head = DistillHead(checkpoint["in_dim"], checkpoint["num_classes"], checkpoint["depth"], checkpoint["dropout"])
    head.load_state_dict(checkpoint["state_dict"])
    return head.eval(), record
