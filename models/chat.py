"""Chat encoding for the processors of every supported VLM family (models/backbones.py):
training batches with answer-only labels, left-padded generation prompts, batched greedy
generation, and the categorical prompt with each class's answer (the class scorer's input).

Messages are in the Hugging Face chat format (``data.annotations`` builds them); the
processor's own chat template renders them, and ``processor(text=..., images=...)`` expands
each image placeholder into that image's visual tokens. Answers always sit at the end of a
rendered conversation, so their token span is found from the text alone, whatever the number
of visual tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from data.annotations import categorical_conversation, prompt_messages
from data.prompts import categorical_question

IGNORE_INDEX = -100  # label value the loss skips


def chat_text(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation rendered by the processor's chat template (not tokenized)."""
    return processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _text_ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_span(processor, conversation: list[dict]) -> tuple[str, int, int]:
    """``(full_text, answer_len, tail_len)`` for a conversation ending in an assistant turn.

    The answer is the assistant's tokens up to and including the end-of-turn token; ``tail_len``
    counts what the template writes after it (a newline), which carries no label.
    """
    full = chat_text(processor, conversation)
    prompt = chat_text(processor, conversation[:-1], add_generation_prompt=True)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full "
                         "conversation; cannot locate the assistant answer")
    full_ids, prompt_ids = _text_ids(processor, full), _text_ids(processor, prompt)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise ValueError("the prompt tokenizes differently inside the full conversation; "
                         "cannot locate the assistant answer")
    suffix = full_ids[len(prompt_ids):]
    end_of_turn = processor.tokenizer.eos_token_id
    answer_len = suffix.index(end_of_turn) + 1 if end_of_turn in suffix else len(suffix)
    return full, answer_len, len(suffix) - answer_len


def answer_ids(processor, conversation: list[dict]) -> list[int]:
    """Token ids of the assistant answer (end-of-turn token included), as the model sees them."""
    full, answer_len, tail_len = answer_span(processor, conversation)
    ids = _text_ids(processor, full)
    return ids[len(ids) - tail_len - answer_len: len(ids) - tail_len]


def _as_images(images: Sequence[Image.Image] | None) -> list[Image.Image] | None:
    return None if images is None else [image.convert("RGB") for image in images]


def encode_prompts(processor, messages_list: Sequence[list[dict]],
                   images: Sequence[Image.Image] | None = None):
    """Generation prompts (``add_generation_prompt``) of a batch, padded on the left."""
    texts = [chat_text(processor, messages, add_generation_prompt=True) for messages in messages_list]
    return processor(text=texts, images=_as_images(images), padding=True, padding_side="left",
                     return_tensors="pt")


def encode_conversations(processor, conversations: Sequence[list[dict]],
                         images: Sequence[Image.Image] | None, train_on_prompt: bool = False):
    """A training batch: the processor's inputs plus ``labels``.

    Labels are the input ids on the assistant answers and ``IGNORE_INDEX`` elsewhere (system,
    question, image and padding tokens); with ``train_on_prompt`` every real text token is
    labelled (image placeholders and padding stay ignored).
    """
    spans = [answer_span(processor, conversation) for conversation in conversations]
    batch = processor(text=[full for full, _, _ in spans], images=_as_images(images), padding=True,
                      padding_side="left", return_tensors="pt")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if train_on_prompt:
        # Image tokens: marked by mm_token_type_ids (Qwen) or by their id alone (LLaVA-OneVision).
        text = batch["mm_token_type_ids"] == 0 if "mm_token_type_ids" in batch \
            else input_ids != processor.image_token_id
        keep = attention_mask.bool() & text
        labels[keep] = input_ids[keep]
    else:
        length = input_ids.shape[1]  # left padding: every conversation ends at the last column
        for row, (_, answer_len, tail_len) in enumerate(spans):
            start, end = length - tail_len - answer_len, length - tail_len
            labels[row, start:end] = input_ids[row, start:end]
    batch["labels"] = labels
    return batch


@torch.no_grad()
def generate_texts(model, processor, messages_list: Sequence[list[dict]],
                   images: Sequence[Image.Image] | None, max_new_tokens: int = 256,
                   batch_size: int = 8) -> list[str]:
    """Greedy answers to generation prompts, ``batch_size`` at a time with left padding.

    ``images`` holds one image per conversation (or None for text-only prompts); returns the
    decoded new text of each, special tokens removed.
    """
    device = next(model.parameters()).device
    texts: list[str] = []
    starts = range(0, len(messages_list), batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=len(starts) < 2):
        end = start + batch_size
        inputs = encode_prompts(processor, messages_list[start:end],
                                None if images is None else images[start:end]).to(device)
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                pad_token_id=processor.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        texts += [text.strip() for text in
                  processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return texts


def categorical_prompt(class_names: Sequence[str]) -> list[dict]:
    """System + user(image, categorical question) messages for one dataset's classes."""
    return prompt_messages(categorical_question(class_names))


def class_conversations(class_names: Sequence[str]) -> list[list[dict]]:
    """The categorical prompt completed by each class's answer, one conversation per class."""
    return [categorical_conversation(name, class_names) for name in class_names]
