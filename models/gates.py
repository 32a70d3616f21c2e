"""Stage 3 gates: fuse the VLM's answer with the distillation head's logits.

Every gate maps ``(vlm_signal, head_logits) -> logits``, all of shape (B, C). ``vlm_signal`` is
the one-hot of the VLM's parsed answer (zeros when it could not be parsed) or a probability
vector; ``head_logits`` are the frozen distillation head's raw logits. ``concat_linear`` is the
paper's gate; the others are the variants of its ablation. Gates that weigh their sources
explicitly (``moe``, ``dynamic_weight``) expose those weights through ``forward_with_weights``,
read uniformly with ``gate_weights``. The VLM input is made from the VLM's answers by
:func:`vlm_gate_inputs` (one of ``SIGNALS``), the head input from the head's logits by
:func:`head_gate_inputs` (one of ``HEAD_SIGNALS``), the same way in stage 3 and in the predictor.
``gate.pt`` is written by :func:`save_gate` and read back by :func:`load_gate`.
:class:`GateEnsemble` trains several gates (stage 3's variants and seeds) in one step.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from utils.checkpoints import STAGE_COMMANDS, read_checkpoint, stamp
from utils.errors import UserError
from utils.io import torch_save
from utils.metrics import NONE

GATE_FILE = "gate.pt"
SIGNALS = ("onehot", "probs")  # what the gate is given of the VLM's answer: --vlm_signal
# What the gate is given of the head (--head_signal): its logits (the reference code's) or their
# softmax (the paper's text: the distilled module's probability distribution).
HEAD_SIGNALS = ("logits", "probs")


def vlm_gate_inputs(predictions, num_classes: int, kind: str = "onehot") -> torch.Tensor:
    """The gate's VLM input from ``VLMPredictions``: one-hot of the answer (the zero vector when
    it could not be parsed) or, for ``probs``, the class distribution of ``score`` mode."""
    if kind == "onehot":
        signal = torch.zeros(len(predictions.pred), num_classes)
        known = predictions.pred != NONE
        signal[known, predictions.pred[known]] = 1.0
        return signal
    if kind == "probs":
        if predictions.probs is None:
            raise UserError("--vlm_signal probs needs class probabilities: use --vlm_answer score")
        return predictions.probs.float()
    raise UserError(f"--vlm_signal {kind}: choose one of {', '.join(SIGNALS)}")


def head_gate_inputs(head_logits: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """The gate's head input from the head's logits: the logits as they are, or for ``probs``
    their softmax over the classes."""
    if kind == "logits":
        return head_logits
    if kind == "probs":
        return head_logits.float().softmax(dim=-1)
    raise UserError(f"--head_signal {kind}: choose one of {', '.join(HEAD_SIGNALS)}")


class ConcatLinearGate(nn.Module):
    """The paper's gate: one linear layer on ``[vlm_signal; head_logits]`` (2C -> C)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(2 * num_classes, num_classes)

    def forward(self, vlm_signal: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([vlm_signal, head_logits], dim=-1))


class BilinearGate(nn.Module):
    """Bilinear + linear terms: ``vlm_signal^T W_k head_logits`` per class plus a linear layer on
    the concatenation, so it contains the paper's gate (registry name ``bilinear``).

    The linear terms are needed: a bare bilinear map is linear in ``head_logits`` once the VLM's
    one-hot picks a slice of W, so it cannot tell a confident head from a hesitant one except
    through their scale, which the argmax ignores (it fails the "which source to trust" test).
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.bilinear = nn.Bilinear(num_classes, num_classes, num_classes)
        self.linear = nn.Linear(2 * num_classes, num_classes, bias=False)

    def forward(self, vlm_signal: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        return self.bilinear(vlm_signal, head_logits) + self.linear(torch.cat([vlm_signal, head_logits], dim=-1))


class MoEGate(nn.Module):
    """Mixture of linear experts over the concatenation, mixed by a softmax router."""

    def __init__(self, num_classes: int, num_experts: int = 3):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(2 * num_classes, num_classes)
                                     for _ in range(num_experts))
        self.router = nn.Linear(2 * num_classes, num_experts)
        self.weight_names = tuple(f"expert_{i}" for i in range(num_experts))

    def forward_with_weights(self, vlm_signal: torch.Tensor, head_logits: torch.Tensor):
        """Return ``(logits (B, C), routing weights (B, num_experts))``."""
        joint = torch.cat([vlm_signal, head_logits], dim=-1)
        weights = self.router(joint).softmax(dim=-1)
        expert_logits = torch.stack([expert(joint) for expert in self.experts], dim=1)  # (B, E, C)
        return (weights.unsqueeze(-1) * expert_logits).sum(dim=1), weights

    def forward(self, vlm_signal: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weights(vlm_signal, head_logits)[0]


class DynamicWeightGate(nn.Module):
    """Per-sample softmax weights for the two sources, weighted sum, then a linear layer."""

    weight_names = ("vlm", "head")

    def __init__(self, num_classes: int):
        super().__init__()
        self.weigher = nn.Linear(2 * num_classes, 2)
        self.linear = nn.Linear(num_classes, num_classes)

    def forward_with_weights(self, vlm_signal: torch.Tensor, head_logits: torch.Tensor):
        """Return ``(logits (B, C), weights (B, 2))`` with columns (vlm, head)."""
        weights = self.weigher(torch.cat([vlm_signal, head_logits], dim=-1)).softmax(dim=-1)
        mixed = weights[:, :1] * vlm_signal + weights[:, 1:] * head_logits
        return self.linear(mixed), weights

    def forward(self, vlm_signal: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        return self.forward_with_weights(vlm_signal, head_logits)[0]


class CrossGate(nn.Module):
    """Each source gates the other through a sigmoid; the gated sources are summed, then linear."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.vlm_gate_from_head = nn.Linear(num_classes, num_classes)
        self.head_gate_from_vlm = nn.Linear(num_classes, num_classes)
        self.linear = nn.Linear(num_classes, num_classes)

    def forward(self, vlm_signal: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
        gated_vlm = torch.sigmoid(self.vlm_gate_from_head(head_logits)) * vlm_signal
        gated_head = torch.sigmoid(self.head_gate_from_vlm(vlm_signal)) * head_logits
        return self.linear(gated_vlm + gated_head)


GATES = {
    "concat_linear": ConcatLinearGate,
    "bilinear": BilinearGate,
    "moe": MoEGate,
    "dynamic_weight": DynamicWeightGate,
    "cross_gate": CrossGate,
}
# What each registry name is, for logs and tables.
GATE_LABELS = {
    "concat_linear": "concat + linear (the paper's gate)",
    "bilinear": "bilinear + linear terms",
    "moe": "mixture of 3 linear experts",
    "dynamic_weight": "dynamic source weights + linear",
    "cross_gate": "cross sigmoid gating + linear",
}


class GateEnsemble(nn.Module):
    """Gates trained together, one optimiser step for all (stage 3's variants and seeds).

    The members of one variant (same class, same parameter shapes) keep their parameters stacked,
    (members, ...) per parameter; each step hands every member its slices (views, so gradients flow
    into the stacks) and runs the member's own module code on its own rows, so each computes
    exactly what it computes alone. ``forward`` takes (E, B, C) inputs and returns (E, B, C);
    :meth:`member` is member ``i`` as a lone gate with its current weights.
    """

    def __init__(self, gates: Sequence[nn.Module]):
        super().__init__()
        self.blueprints = [copy.deepcopy(gate) for gate in gates]  # lone copies, for member()
        self._members = list(gates)  # their parameters become views into the stacks below
        groups: dict[tuple, list[int]] = {}
        for index, gate in enumerate(gates):
            key = (type(gate), tuple((name, tuple(p.shape)) for name, p in gate.named_parameters()))
            groups.setdefault(key, []).append(index)
        self.stacks = nn.ParameterList()
        self.groups: list[tuple[list[int], list[str], int]] = []  # (members, parameter names, first stack)
        self.position: dict[int, tuple[int, int]] = {}  # member -> (group, its index in the group)
        for group, ((_, shapes), members) in enumerate(groups.items()):
            names = [name for name, _ in shapes]
            self.groups.append((members, names, len(self.stacks)))
            for name in names:
                self.stacks.append(nn.Parameter(torch.stack(
                    [dict(gates[i].named_parameters())[name].detach() for i in members])))
            for slot, i in enumerate(members):
                self.position[i] = (group, slot)
                for name in names:
                    owner, attr = _owner(gates[i], name)
                    del owner._parameters[attr]

    def __len__(self) -> int:
        return len(self._members)

    def forward(self, vlm_signal: torch.Tensor, head_input: torch.Tensor) -> torch.Tensor:
        for members, names, first in self.groups:
            views = [stack.unbind(0) for stack in self.stacks[first:first + len(names)]]
            for slot, i in enumerate(members):
                for name, stack_views in zip(names, views):
                    owner, attr = _owner(self._members[i], name)
                    object.__setattr__(owner, attr, stack_views[slot])  # a plain attribute: the module reads it
        return torch.stack([gate(vlm_signal[i], head_input[i]) for i, gate in enumerate(self._members)])

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s state dict (CPU copies), as its lone gate's."""
        group, slot = self.position[index]
        _, names, first = self.groups[group]
        return {name: self.stacks[first + k][slot].detach().to("cpu", copy=True) for k, name in enumerate(names)}

    def member(self, index: int) -> nn.Module:
        """Member ``index`` as a lone gate with its current weights, on the stacks' device, eval mode."""
        gate = copy.deepcopy(self.blueprints[index])
        gate.load_state_dict(self.member_state(index))
        return gate.to(self.stacks[0].device).eval()


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule holding parameter ``name`` ("experts.0.weight") and the attribute's name."""
    *path, attr = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, attr


def build_gate(name: str, num_classes: int) -> nn.Module:
    """The gate called ``name`` (a key of GATES) for ``num_classes`` classes."""
    if name not in GATES:
        raise UserError(f"unknown gate {name!r}; choose one of: {', '.join(GATES)}")
    return GATES[name](num_classes)


@torch.no_grad()
def gate_weights(gate: nn.Module, vlm_signal: torch.Tensor,
                 head_logits: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """How much each source (or expert) weighed, ``{name: (B,) tensor}``; None if not exposed."""
    if not hasattr(gate, "forward_with_weights"):
        return None
    weights = gate.forward_with_weights(vlm_signal, head_logits)[1]
    return {name: weights[:, i] for i, name in enumerate(gate.weight_names)}


def save_gate(path: str | Path, name: str, gate: nn.Module, class_names: Sequence[str], **fields) -> Path:
    """``gate.pt``: weights, the registry ``name``, class names and ``fields``: the gate's
    provenance (how its inputs were computed, the ids of the adapter and head it fuses; their keys
    in docs/ARCHITECTURE.md, "Checkpoints"), written here only."""
    state = {key: value.detach().cpu() for key, value in gate.state_dict().items()}
    return torch_save(stamp({"state_dict": state, "gate": name, "num_classes": len(class_names),
                             "class_names": list(class_names), **fields}, "gate"), path)


def load_gate(path: str | Path, dataname: str = "<dataname>") -> tuple[nn.Module, dict]:
    """``(gate with its trained weights, the rest of gate.pt)``, eval mode, CPU; ``path`` is the
    file or a stage-3 folder (its ``gate.pt``)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / GATE_FILE
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} (stage 3 did not finish); rerun "
                        f"`{STAGE_COMMANDS['gate'].format(dataname=dataname)}`")
    checkpoint = read_checkpoint(path, "gate", dataname)
    gate = build_gate(checkpoint["gate"], checkpoint["num_classes"])
    gate.load_state_dict(checkpoint.pop("state_dict"))  # strict: every trained weight is used
    return gate.eval(), checkpoint
