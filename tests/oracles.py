"""Slow, obviously correct references that tests compare the fast library code against."""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from models.chat import class_conversations
from models.chat import IGNORE_INDEX, encode_conversations


@torch.no_grad()
def score_classes_full(model, processor, images: Sequence[Image.Image],
                       class_names: Sequence[str]) -> torch.Tensor:
    """Reference for ``models.scorer.score_classes``: every (image, class) conversation encoded
    and run whole, one at a time; the summed log-likelihood of the answer tokens, (N, C) on CPU."""
    device = next(model.parameters()).device
    conversations = class_conversations(class_names)
    scores = torch.zeros(len(images), len(class_names))
    for i, image in enumerate(images):
        for c, conversation in enumerate(conversations):
            batch = encode_conversations(processor, [conversation], [image]).to(device)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            scores[i, c] = log_probs[keep].gather(-1, targets[keep].unsqueeze(-1)).sum().cpu()
    return scores


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss ``compute()`` returns and the gradient it gives each trainable parameter of ``model``
    (gradients cleared before, so two computations compare side by side)."""
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()
             if param.requires_grad and param.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads
