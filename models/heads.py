"""The distillation head: a small MLP on the VLM's mean-pooled, frozen visual features, and the
distillation loss it is trained with."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN_WIDTHS = (1024, 512, 256, 128, 64)


class DistillHead(nn.Module):
    """``in_dim -> [1024, 512, 256, 128, 64][:depth] -> num_classes`` with GELU and dropout.

    ``feature_mean``/``feature_std`` are saved buffers applied to the input first, so whoever
    loads the head (stage 3, the demo) feeds it raw pooled features. They stay 0/1 (identity,
    the paper's setting) unless the features were standardised in training.
    """

    def __init__(self, in_dim: int, num_classes: int, depth: int = 1, dropout: float = 0.1):
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
