"""The distillation head: a small MLP on the VLM's mean-pooled, frozen visual features, the
distillation loss it is trained with, its logits over cached features (:func:`head_logits`), and
its checkpoint ``head.pt`` (:func:`save_head` writes it, :func:`load_head` reads it back)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
                      alpha: float, temperature: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)``.

    KL is averaged over the batch; T^2 keeps the soft-target gradients on the scale of the CE term.
    """
    kd = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                  F.log_softmax(teacher_logits / temperature, dim=-1), reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits, targets)
    return alpha * temperature ** 2 * kd + (1 - alpha) * ce


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
