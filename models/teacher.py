"""The conventional vision teacher (a timm model) and its self-describing checkpoint.

``teacher.pt`` holds ``{format_version, kind, state_dict, model, img_size, class_names,
data_config, pretrained, best_val_acc, epoch}``: enough to rebuild the network and its eval
transform without the training script's flags. :func:`save_teacher` writes it and
:func:`load_teacher` reads it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
from timm.data import create_transform, resolve_data_config

from utils.checkpoints import read_checkpoint, stamp
from utils.errors import UserError, first_line
from utils.io import torch_save

# The authors fine-tune google/vit-base-patch16-384 (ImageNet-21k pretraining, ImageNet-1k
# fine-tuning at 384 px); timm names the same weights so.
DEFAULT_TEACHER = "vit_base_patch16_384.orig_in21k_ft_in1k"
# The authors' preprocessing, for every teacher they train (ViT-B/16, VGG-16, ResNet-50): 384 px,
# mean and std 0.5 per channel, bilinear resizing, the whole resized image as the centre crop (the
# Hugging Face ViT image processor's). timm's own config for the default weights resizes bicubically.
REFERENCE_IMG_SIZE = 384
REFERENCE_PREPROCESSING = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
                           "crop_pct": 1.0}
# --teacher_data_config: the reference's preprocessing for every teacher (the default), or timm's own
# pretrained data config of each checkpoint (its size, mean/std, interpolation and crop).
PREPROCESSING = ("reference", "timm")


def check_teacher_name(model_name: str) -> str:
    """``model_name`` when timm knows it; otherwise a UserError naming the flag."""
    if not timm.is_model(model_name):
        raise UserError(f"--teacher_model {model_name}: unknown timm model; list them with "
                        "`python -c \"import timm; print(timm.list_models('vit_*'))\"`")
    return model_name


def default_img_size(model_name: str, preprocessing: str = "reference") -> int:
    """The teacher's input size when --teacher_img_size is not given: 384 px, the reference's for
    every teacher, or with ``preprocessing`` ``timm`` the size the checkpoint was trained at."""
    check_teacher_name(model_name)
    if preprocessing == "reference":
        return REFERENCE_IMG_SIZE
    return timm.models.get_pretrained_cfg(model_name).input_size[-1]


def build_teacher(model_name: str, num_classes: int, img_size: int | None = None,
                  pretrained: bool = True) -> torch.nn.Module:
    """A timm model with a fresh ``num_classes`` head; ``img_size`` resizes fixed-size models (ViT)."""
    check_teacher_name(model_name)
    kwargs = {"num_classes": num_classes}
    if img_size is not None and timm.models.get_pretrained_cfg(model_name).fixed_input_size:
        kwargs["img_size"] = img_size  # ViTs resize their position embeddings; CNNs take any size
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise UserError(f"--teacher_model {model_name}: cannot load pretrained weights ({first_line(err)}); "
                        "connect to the Hugging Face hub once, or pass --no_teacher_pretrained") from None


def data_config(model: torch.nn.Module, img_size: int | None = None, preprocessing: str = "reference") -> dict:
    """The preprocessing at ``img_size`` (default: :func:`default_img_size`): the authors' for every
    teacher (:data:`REFERENCE_PREPROCESSING`: mean and std 0.5, bilinear, no crop margin), or with
    ``preprocessing`` ``timm`` timm's own for this checkpoint (its mean/std/interpolation/crop)."""
    pretrained = model.pretrained_cfg
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"preprocessing {preprocessing!r}: expected one of {PREPROCESSING}")
    default = REFERENCE_IMG_SIZE if preprocessing == "reference" else pretrained["input_size"][-1]
    size = img_size or default
    # resolve_data_config ignores a model's custom img_size unless input_size is given explicitly.
    config = resolve_data_config({"input_size": (3, size, size)}, model=model)
    if preprocessing == "reference":
        config.update(REFERENCE_PREPROCESSING)
    return config


def teacher_transforms(config: dict):
    """``(train, eval)``: random resized crop + horizontal flip; resize + centre crop. Normalised."""
    train = create_transform(**config, is_training=True, color_jitter=None)
    return train, create_transform(**config, is_training=False)


def save_teacher(path: str | Path, model: torch.nn.Module, model_name: str, img_size: int,
                 class_names: Sequence[str], config: dict, pretrained: bool, best_val_acc: float,
                 epoch: int) -> Path:
    """``teacher.pt``: weights plus what rebuilds the model and its transform (read by :func:`load_teacher`)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return torch_save(stamp({"state_dict": state, "model": model_name, "img_size": img_size,
                             "class_names": list(class_names), "data_config": dict(config),
                             "pretrained": pretrained, "best_val_acc": best_val_acc, "epoch": epoch}, "teacher"),
                      path)


def read_teacher_checkpoint(path: str | Path, class_names: Sequence[str] | None = None,
                            dataname: str = "<dataname>") -> dict:
    """The saved teacher dict, checked: it must be a teacher.pt this code reads and fit ``class_names``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher checkpoint {path}: no such file")
    checkpoint = read_checkpoint(path, "teacher", dataname)
    if class_names is not None and list(checkpoint["class_names"]) != list(class_names):
        raise UserError(f"teacher checkpoint {path}: trained for classes {checkpoint['class_names']}, "
                        f"but this dataset has {list(class_names)}; train a teacher for this dataset")
    return checkpoint


def load_teacher(path: str | Path, class_names: Sequence[str] | None = None,
                 device: str | torch.device = "cpu", dataname: str = "<dataname>") -> tuple[torch.nn.Module, dict]:
    """Rebuild a saved teacher (eval mode) and return it with its checkpoint dict."""
    checkpoint = read_teacher_checkpoint(path, class_names, dataname)
    model = build_teacher(checkpoint["model"], len(checkpoint["class_names"]), checkpoint["img_size"],
                          pretrained=False)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint
