"""Stage 1 library: instruction examples from annotations, the masking collator, LoRA/QLoRA
wrapping, the transformers ``Trainer`` set-up and the per-epoch log."""
from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from data.annotations import TASKS, Annotation, categorical_conversation, to_conversations
from data.datasets import DatasetSplits, open_image
from models.backbones import BACKBONES, backbone_for
from models.chat import encode_conversations
from utils.dist import distributed_rank
from utils.errors import UserError, first_line
from utils.io import follow_umask, write_failure, write_text
from utils.metrics import save_curves_png
from utils.outputs import check_finite

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = BACKBONES["qwen2_vl"].lora_targets  # the paper's; each family's in models.backbones


def build_examples(annotations: Sequence[Annotation], splits: DatasetSplits,
                   annotations_path: str | Path,
                   missing_hint: str = "run stage 0 again to finish them") -> list[dict]:
    """``{"conversation", "image", "task"}`` items: the categorical conversation for **every**
    training image (it needs no generated text), observation and reasoning where stage 0 wrote
    an annotation for the image.

    An annotation whose image is gone is a UserError; one for an image outside the training
    split (e.g. moved to the validation split) is skipped with a warning. ``missing_hint`` ends
    the warning about training images without text (what to do about them).
    """
    train_paths = {sample.path for sample in splits.train}
    annotated, outside = {}, []
    for annotation in annotations:
        path = splits.data_root / annotation.image
        if not path.is_file():
            raise UserError(f"{annotations_path}: image {annotation.image} no longer exists under "
                            f"--data_root {splits.data_root}; restore it or rerun stage 0")
        if annotation.image not in train_paths:
            outside.append(annotation.image)
            continue
        annotated[annotation.image] = to_conversations(annotation, splits.class_names)
    if outside:
        log.warning("skipping %d annotation(s) of images outside the training split (e.g. %s): "
                    "they are validation/test images", len(outside), outside[0])
    examples = []
    for sample in splits.train:
        image = str(splits.absolute(sample))
        conversations = annotated.get(sample.path) or {
            "categorical": categorical_conversation(splits.class_names[sample.label], splits.class_names)}
        examples.extend({"conversation": conversation, "image": image, "task": task}
                        for task, conversation in conversations.items())
    missing = len(splits.train) - len(annotated)
    if missing:
        log.warning("%d of %d training images have no stage-0 text: they get the categorical conversation "
                    "only; %s", missing, len(splits.train), missing_hint)
    return examples


def example_counts(examples: Sequence[dict], num_train: int) -> dict:
    """Training images with and without generated text, and conversations per task."""
    per_task = {task: sum(example["task"] == task for example in examples) for task in TASKS}
    return {"train_images": num_train, "with_text": per_task["observation"],
            "without_text": num_train - per_task["observation"], "conversations": per_task}


class ConversationCollator:
    """Opens the images of a batch and encodes it with answer-only labels (``models.chat``)."""

    def __init__(self, processor, train_on_prompt: bool = False):
        self.processor = processor
        self.train_on_prompt = train_on_prompt

    def __call__(self, items: Sequence[dict]) -> dict:
        images = [open_image(item["image"]) for item in items]
        batch = encode_conversations(self.processor, [item["conversation"] for item in items], images,
                                     self.train_on_prompt)
        return dict(batch)


def wrap_lora(model, r: int, alpha: int, dropout: float, target_modules: Sequence[str] | None,
              modules_to_save: Sequence[str] | None, quantized: bool, gradient_checkpointing: bool):
    """peft LoRA on ``model`` (after k-bit preparation when 4-bit); prints trainable parameters.

    ``target_modules`` None takes the family's default; the family's visual encoder is never adapted.
    """
    backbone = backbone_for(model)
    target_modules = target_modules or backbone.lora_targets
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        modules_to_save=list(modules_to_save) or None, bias="none",
                        exclude_modules=backbone.lora_exclude)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"--target_modules/--modules_to_save: {first_line(err)}") from None
    model.print_trainable_parameters()
    return model


def last_checkpoint(trainer_dir: str | Path) -> str | None:
    return get_last_checkpoint(str(trainer_dir)) if Path(trainer_dir).is_dir() else None


class CheckpointRights(TrainerCallback):
    """Gives a Trainer checkpoint's safetensors files (written 0600 whatever the umask) the mode of
    the umask, like every other file."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        follow_umask(*folder.glob("*.safetensors"))


@contextmanager
def checkpoint_writes(trainer_dir: str | Path) -> Iterator[None]:
    """Training inside the block: a Trainer checkpoint that cannot be written (a full disk or quota,
    no rights) is removed and raised as an OSError naming it (one line from ``run_cli``); the
    checkpoints before it are kept. A complete checkpoint holds ``trainer_state.json``, written last."""
    try:
        yield
    except Exception as err:
        partial = [folder for folder in Path(trainer_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if not (folder / "trainer_state.json").is_file()]
        failure = write_failure(err, partial[0] if partial else trainer_dir)
        if failure is None:
            raise
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
        if failure is err:
            raise
        raise failure from err


def epoch_logger(log_path: str | Path, curves_path: str | Path, history: list[dict] | None = None):
    """A TrainerCallback appending one JSON line per epoch (mean loss, lr, grad norm) to log.txt
    and redrawing the loss curve; only the main process writes."""
    class EpochLogger(TrainerCallback):
        def __init__(self):
            self.history = list(history or [])

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Logging is per epoch; the epoch's loss arrives here, after on_epoch_end.
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            check_finite(logs["loss"], f"the training loss in epoch {round(float(state.epoch))}", "--lr")
            row = {"epoch": round(float(state.epoch)), "train_loss": float(logs["loss"]),
                   "lr": float(logs.get("learning_rate", 0.0)), "step": state.global_step}
            if "grad_norm" in logs:
                row["grad_norm"] = float(logs["grad_norm"])
            self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]
            write_text(log_path, "".join(json.dumps(h) + "\n" for h in self.history))
            save_curves_png([{k: h[k] for k in ("epoch", "train_loss")} for h in self.history],
                            curves_path, "stage 1: instruction tuning")
            print(json.dumps(row))

    return EpochLogger()


def read_history(log_path: str | Path) -> list[dict]:
    path = Path(log_path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def scheduler_name(lr_scheduler: str, warmup_ratio: float) -> str:
    """The transformers schedule to run. The reference asks for ``constant`` with a 3% warm-up,
    but transformers' ``constant`` ignores warm-up, so its run had none: ``constant`` without
    warm-up is the default, and a ``--warmup_ratio`` above 0 turns it into ``constant_with_warmup``."""
    if lr_scheduler == "constant" and warmup_ratio > 0:
        return "constant_with_warmup"
    return lr_scheduler


def tf32_supported() -> bool:
    """Whether this machine's GPU has TF32 matmuls (Ampere, compute capability 8.0, or newer)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def trainer_settings(args, trainer_dir: str | Path, on_gpu: bool) -> dict:
    """The Trainer's keyword arguments from the stage-1 flags (paper defaults). On a GPU, as the
    reference run: bf16, gradient checkpointing, the fused AdamW kernel and TF32 matmuls (where
    the GPU has them); on CPU the plain AdamW in float32."""
    tf32 = on_gpu and tf32_supported()
    if on_gpu and not tf32:
        log.warning("this GPU has no TF32 matmuls (it needs compute capability 8.0 or newer); training without")
    return dict(
        output_dir=str(trainer_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=scheduler_name(args.lr_scheduler, args.warmup_ratio),
        # transformers 5 reads a float below 1 as a fraction of the training steps.
        warmup_steps=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        weight_decay=args.weight_decay,
        optim="adamw_torch_fused" if on_gpu else "adamw_torch",
        tf32=True if tf32 else None,  # None leaves torch's own setting (transformers refuses True without TF32)
        bf16=on_gpu,
        activation_checkpointing=on_gpu,
        activation_checkpointing_kwargs={"use_reentrant": False} if on_gpu else None,
        logging_strategy="epoch",
        logging_nan_inf_filter=False,  # a diverged loss must show, not be averaged away
        save_strategy="epoch",
        save_total_limit=1,
        remove_unused_columns=False,
        dataloader_num_workers=args.num_workers,
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not on_gpu,
        ddp_find_unused_parameters=False,
        # CPU processes under a launcher talk through gloo (nccl is GPU only).
        ddp_backend="gloo" if not on_gpu and distributed_rank()[2] > 1 else None,
    )


def training_arguments(args, trainer_dir: str | Path, on_gpu: bool) -> TrainingArguments:
    """The Trainer's settings (:func:`trainer_settings`); building them turns TF32 on where asked."""
    return TrainingArguments(**trainer_settings(args, trainer_dir, on_gpu))


def check_placement(training_args, device: torch.device) -> None:
    """Refuse to train when the Trainer would not run on ``device`` alone: it puts a single
    process on cuda:0 and spreads it over every visible GPU with DataParallel."""
    placed = training_args.device
    if training_args.n_gpu > 1 or placed.type != device.type or (device.type == "cuda" and placed.index != device.index):
        raise UserError(f"the trainer would run on {placed} over {training_args.n_gpu} GPU(s), "
                        f"but the model is on {device}; run one process per GPU: set CUDA_VISIBLE_DEVICES=<gpu> or "
                        "launch `torchrun --nproc_per_node <GPUs> train_vlm.py ...` for data parallel training")
