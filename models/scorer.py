"""The class scorer: the instruction-tuned VLM as a classifier over a dataset's classes.

``score`` (default) ranks the classes by the log-likelihood of each class's categorical answer
(``{'emotion': '<class>'}``) given the image and question. The prompt (image included) is
encoded once per image and its key/value cache serves all C candidate answers, which run
together in one packed row (a token tree), so only the few class-specific answer tokens are added. ``generate`` decodes an answer greedily and parses it.
Both are deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from data.prompts import parse_emotion
from models.backbones import backbone_for
from models.chat import answer_ids, categorical_prompt, class_conversations, encode_prompts, generate_texts
from utils.errors import UserError
from utils.metrics import NONE

EVAL_MODES = ("score", "generate")


@dataclass
class VLMPredictions:
    pred: torch.Tensor            # (N,) long, -1 where no class could be read
    probs: torch.Tensor | None    # (N, C) float, score mode only
    texts: list[str] | None       # generated answers, generate mode only


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _candidate_tokens(processor, class_names: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class's answer tokens (end-of-turn included), right-padded: ids (C, L), mask (C, L).

    Rendered once per ``score_classes`` call, for all its batches (about 20 ms for 8 classes)."""
    ids = [answer_ids(processor, conversation) for conversation in class_conversations(class_names)]
    length = max(len(tokens) for tokens in ids)
    pad = processor.tokenizer.pad_token_id
    tokens = torch.tensor([t + [pad] * (length - len(t)) for t in ids], device=device)
    mask = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in ids], device=device)
    return tokens, mask


def _shared_prefix_length(candidates: torch.Tensor, mask: torch.Tensor) -> int:
    """Leading tokens all class answers share (``{'emotion': '``), leaving each at least one."""
    limit = int(mask.sum(dim=1).min()) - 1
    same = (candidates[:, :limit] == candidates[:1, :limit]).all(dim=0).tolist()
    return same.index(False) if False in same else limit


def _packed_continuations(candidates: torch.Tensor, mask: torch.Tensor):
    """All classes' answer continuations side by side in one row (a token tree).

    Returns per packed token: its id, class, offset inside its answer and the next token it
    predicts (K,), plus the (K, K) mask letting a token see only earlier tokens of its own answer.
    """
    lengths = mask.sum(dim=1) - 1  # the last answer token is only predicted, never fed
    tokens, classes, offsets, targets = [], [], [], []
    for c, length in enumerate(lengths.tolist()):
        tokens.append(candidates[c, :length])
        targets.append(candidates[c, 1:length + 1])
        classes.append(torch.full((length,), c, device=candidates.device))
        offsets.append(torch.arange(length, device=candidates.device))
    tokens, classes, offsets, targets = (torch.cat(t) for t in (tokens, classes, offsets, targets))
    visible = (classes[:, None] == classes[None, :]) & (offsets[None, :] <= offsets[:, None])
    return tokens, classes, offsets, targets, visible


@torch.no_grad()
def score_classes(model, processor, images: Sequence[Image.Image], class_names: Sequence[str],
                  batch_size: int = 8) -> torch.Tensor:
    """Summed log-likelihood of every class answer per image: (N, C) float32 on CPU.

    One prompt forward per image with ``use_cache``; the answer prefix all classes share is
    appended to the prompt, so it runs once too. The class-specific rest of the C answers then
    runs as one packed row per image on that cache: a 4-D attention mask lets each answer see
    the prompt and its own earlier tokens only. Positions are explicit on both passes: the
    family's own rotary positions for the prompt (``models.backbones``; 3-D for the Qwen
    families), and for each answer token the prompt's last position + 1 + its offset, so every
    answer continues its own prompt whatever the left padding, and nothing depends on state an
    earlier forward left on the model.
    """
    device = _device(model)
    backbone = backbone_for(model)
    candidates, candidate_mask = _candidate_tokens(processor, class_names, device)
    shared = _shared_prefix_length(candidates, candidate_mask)
    prefix = candidates[0, :shared]
    candidates, candidate_mask = candidates[:, shared:], candidate_mask[:, shared:]
    tokens, classes, offsets, targets, visible = _packed_continuations(candidates, candidate_mask)
    num_classes, packed = len(class_names), len(tokens)
    prompt = categorical_prompt(class_names)
    scores = []
    for start in range(0, len(images), batch_size):
        batch_images = images[start:start + batch_size]
        batch = len(batch_images)
        inputs = encode_prompts(processor, [prompt] * batch, batch_images).to(device)
        # Left padding: every prompt ends at the last column, so the prefix is appended there.
        inputs["input_ids"] = torch.cat([inputs["input_ids"], prefix.expand(batch, -1)], dim=1)
        inputs["attention_mask"] = torch.cat(
            [inputs["attention_mask"], torch.ones_like(inputs["attention_mask"][:, :shared])], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros_like(inputs["mm_token_type_ids"][:, :shared])], dim=1)
        prompt_positions = backbone.prompt_positions(model, inputs)
        out = model(**inputs, position_ids=prompt_positions, use_cache=True, logits_to_keep=shared + 1)
        log_probs = torch.log_softmax(out.logits.float(), dim=-1)              # (B, shared+1, V)
        prefix_score = log_probs[:, :-1].gather(-1, prefix.expand(batch, -1).unsqueeze(-1)).sum(dim=(1, 2))
        # The first class-specific token is predicted by the last prompt position.
        total = prefix_score[:, None] + log_probs[:, -1][:, candidates[:, 0]]  # (B, C)
        if packed:
            prompt_mask = inputs["attention_mask"]
            # (3, B, K) or (B, K): padding sits at position 0, so the maximum is the last real one.
            positions = prompt_positions.amax(dim=-1, keepdim=True) + 1 + offsets
            allowed = torch.cat([prompt_mask.bool()[:, None, :].expand(-1, packed, -1),
                                 visible.expand(batch, -1, -1)], dim=2)[:, None]  # (B, 1, K, prompt+K)
            dtype = out.logits.dtype if out.logits.is_floating_point() else torch.float32
            attention = torch.zeros(allowed.shape, dtype=dtype, device=device)
            attention.masked_fill_(~allowed, torch.finfo(dtype).min)
            rest = model(input_ids=tokens.expand(batch, -1), attention_mask=attention, position_ids=positions,
                         cache=out.cache, use_cache=True)
            rest_log_probs = torch.log_softmax(rest.logits.float(), dim=-1)    # (B, K, V)
            token_scores = rest_log_probs.gather(-1, targets.expand(batch, -1).unsqueeze(-1)).squeeze(-1)
            total = total.index_add(1, classes, token_scores)
        scores.append(total.cpu())
    return torch.cat(scores) if scores else torch.empty(0, num_classes)


def predict_vlm(model, processor, images: Sequence[Image.Image], class_names: Sequence[str],
                mode: str = "score", batch_size: int = 8, max_new_tokens: int = 256,
                parser: str = "lenient") -> VLMPredictions:
    """The VLM's class for each image (``score`` or ``generate``; see the module docstring);
    ``parser`` (``strict`` or ``lenient``, see ``data.prompts.parse_emotion``) reads generated answers."""
    if mode == "score":
        probs = torch.softmax(score_classes(model, processor, images, class_names, batch_size), dim=-1)
        return VLMPredictions(pred=probs.argmax(dim=-1), probs=probs, texts=None)
    if mode == "generate":
        prompt = categorical_prompt(class_names)
        texts = generate_texts(model, processor, [prompt] * len(images), images, max_new_tokens, batch_size)
        parsed = [parse_emotion(text, class_names, parser) for text in texts]
        pred = torch.tensor([NONE if index is None else index for index in parsed], dtype=torch.long)
        return VLMPredictions(pred=pred, probs=None, texts=texts)
    raise UserError(f"--eval_mode {mode}: choose one of {', '.join(EVAL_MODES)}")
