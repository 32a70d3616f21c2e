"""Stage 1 library: instruction examples from annotations, the masking collator, LoRA/QLoRA
wrapping, the transformers ``Trainer`` set-up (its loss computed from the logits at the labelled
positions only), the per-epoch validation and the per-epoch log."""
from __future__ import annotations

import inspect
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, unwrap_peft_model

from data.annotations import TASKS, TEXT_TASKS, Annotation, categorical_conversation, to_conversations
from data.datasets import DatasetSplits, open_image
from engine.vlm_answers import predict_samples
from models.backbones import BACKBONES, backbone_for
from models.chat import IGNORE_INDEX, encode_conversations
from utils.dist import distributed_rank
from utils.errors import UserError, first_line
from utils.io import follow_umask, write_failure, write_text
from utils.metrics import save_curves_png
from utils.outputs import check_finite
from utils.tracking import trainer_reporting

log = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = BACKBONES["qwen2_vl"].lora_targets  # the paper's; each family's in models.backbones


def build_examples(annotations: Sequence[Annotation], splits: DatasetSplits,
                   annotations_path: str | Path | None,
                   missing_hint: str = "run stage 0 again to finish them",
                   tasks: Sequence[str] = TASKS) -> list[dict]:
    """``{"conversation", "image", "task"}`` items of the ``tasks`` chosen (stage 1's ``--tasks``,
    default all three): the categorical conversation for **every** training image (it needs no
    generated text), observation and reasoning where stage 0 wrote an annotation for the image.

    An annotation whose image is gone is a UserError; one for an image outside the training
    split (e.g. moved to the validation split) is skipped with a warning. ``missing_hint`` ends
    the warning about training images without text (what to do about them). No conversation at
    all (text tasks only, and no training image has text) is a UserError.
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
                        for task, conversation in conversations.items() if task in tasks)
    missing = len(splits.train) - len(annotated)
    if missing and any(task in TEXT_TASKS for task in tasks):
        log.warning("%d of %d training images have no stage-0 text: they get %s; %s", missing, len(splits.train),
                    "the categorical conversation only" if "categorical" in tasks else "no conversation",
                    missing_hint)
    if not examples:
        raise UserError(f"--tasks {' '.join(tasks)}: no training image has stage-0 text ({annotations_path}), so "
                        "there is nothing to train on; run stage 0 or add categorical to --tasks")
    return examples


def example_counts(examples: Sequence[dict], num_train: int) -> dict:
    """Training images with and without generated text trained on, and conversations per task
    (0 for a task not chosen)."""
    per_task = {task: sum(example["task"] == task for example in examples) for task in TASKS}
    with_text = len({example["image"] for example in examples if example["task"] in TEXT_TASKS})
    return {"train_images": num_train, "with_text": with_text, "without_text": num_train - with_text,
            "conversations": per_task}


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


# ---------------------------------------------------------------- the loss, where the labels are

def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)`` of a batch's ``labels`` (B, L): ``keep`` (B, L) bool marks the positions
    whose logits the loss reads, those whose *next* token is labelled (the logits at t predict
    token t + 1; the last position predicts nothing), and ``targets`` (K,) are those next tokens,
    in ``keep``'s row-major order (the order ``hidden[keep]`` gathers the positions in)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep, labels[:, 1:][keep[:, :-1]]


def kept_logits_loss(model, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None):
    """``(loss, outputs)``: the causal language-model loss of ``inputs`` (with ``labels``), its
    151,936-wide logits computed only at :func:`loss_positions` (``logits_to_keep``, a boolean
    mask the model applies to its hidden states before the output layer; ``outputs.logits`` is
    (K, vocabulary)).

    The same loss as transformers' ``ForCausalLMLoss`` on the logits of every position: float32
    cross-entropy over the labelled next tokens, their mean, or, given ``num_items_in_batch``
    (the Trainer's count of labelled tokens over an accumulated batch), their sum divided by it.
    The positions left out carry no label, so they add nothing to the loss or its gradients."""
    inputs = dict(inputs)
    keep, targets = loss_positions(inputs.pop("labels"))
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits.float()  # as ForCausalLMLoss: the loss in float32
    targets = targets.to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, reduction="mean"), outputs
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return F.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch, outputs


def keeps_logits(model) -> bool:
    """Whether ``model`` (peft-wrapped or not) takes ``logits_to_keep`` in its forward; every
    supported family does in the transformers release requirements.txt names."""
    base = unwrap_peft_model(model)
    return "logits_to_keep" in inspect.signature(base.forward).parameters


class AnswerLogitsTrainer(Trainer):
    """The Trainer of stage 1: the output layer runs only at the positions the loss reads
    (:func:`kept_logits_loss`: the answers; every text token with ``--train_on_prompt``), not at
    every position of a ~1,300-token example, the same loss and gradients as the Trainer's own
    computation. Everything else (gradient accumulation, the count of labelled tokens across
    processes) is the Trainer's: the loss is normalised as :meth:`Trainer.compute_loss` does
    (by ``num_items_in_batch`` where the model accepts loss keywords, else per batch) and scaled
    for averaging across devices the same way. A model without ``logits_to_keep`` falls back to
    the Trainer's own computation (all positions)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keep_logits = keeps_logits(self.model)
        if not self.keep_logits:
            log.warning("this model's forward takes no logits_to_keep: the loss reads the logits of every position")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.keep_logits or "labels" not in inputs or self.label_smoother is not None \
                or self.compute_loss_func is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss, outputs = kept_logits_loss(model, inputs, num_items_in_batch if normalised else None)
        if self.args.average_tokens_across_devices and normalised:  # as Trainer.compute_loss
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


# ---------------------------------------------------------------- the validation after each epoch

def val_scorer(samples: Sequence, data_root: str | Path, class_names: Sequence[str], processor,
               batch_size: int = 8, pre_resize: int | None = None) -> Callable:
    """``validate(model) -> accuracy``: the class scorer (``score`` mode, as the test evaluation)
    over the validation ``samples``, one prompt forward per image. The model is scored in eval
    mode without gradients, then put back in the mode it was in; under torchrun every rank must
    call it (the images are sharded across the ranks, as in the test evaluation)."""
    labels = torch.tensor([sample.label for sample in samples])

    def validate(model) -> float:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), scoring_attention(model):
                result = predict_samples(model, processor, data_root, samples, class_names, "score", batch_size,
                                         max_new_tokens=1, desc="val (score)", pre_resize=pre_resize)
        finally:
            model.train(was_training)
        return float((result.pred == labels).float().mean())

    return validate


@contextmanager
def scoring_attention(model):
    """The class scorer's packed answers need a 4-D attention mask, which FlashAttention-2 does
    not take: a model trained with it is scored with ``sdpa``, then switched back."""
    base = unwrap_peft_model(model)
    before = getattr(base.config, "_attn_implementation", None)
    if before != "flash_attention_2":
        yield
        return
    base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        base.set_attn_implementation(before)


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


def epoch_logger(log_path: str | Path, curves_path: str | Path, history: list[dict] | None = None,
                 validate: Callable | None = None):
    """A TrainerCallback appending one JSON line per epoch (mean loss, lr, grad norm and, with
    ``validate`` (:func:`val_scorer`), the validation accuracy ``val_acc`` of the weights at the
    epoch's end) to log.txt and redrawing the curves; only the main process writes. Validating
    changes no weight and no choice of weights: the Trainer saves the last epoch's either way.

    With ``--report_to`` the Trainer logs every step (utils.tracking.trainer_reporting): the
    epoch's row is then the mean of its steps' losses with the last step's lr and grad norm, and
    goes to the trackers through ``report`` (set it to the Trainer's ``log``) as ``epoch_loss``
    and ``val_acc``."""
    class EpochLogger(TrainerCallback):
        def __init__(self):
            self.history = list(history or [])
            self.val_acc = None
            self.steps: list[dict] = []  # the epoch's step logs, when the Trainer logs every step
            self.report: Callable[[dict], None] | None = None

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            # Every rank scores its share of the images; the Trainer logs the epoch right after.
            if validate is not None:
                self.val_acc = validate(model)
            if self.steps:  # logged per step (rank 0): the epoch's row from its steps
                steps, self.steps = self.steps, []
                row = self.write(state, {**steps[-1], "loss": sum(step["loss"] for step in steps) / len(steps)})
                if self.report is not None:  # "train_loss" is the Trainer's name for the run's mean at its end
                    self.report({"epoch_loss": row["train_loss"],
                                 **({"val_acc": row["val_acc"]} if "val_acc" in row else {})})

        def on_log(self, args, state, control, logs=None, **kwargs):
            # Logging is per epoch; the epoch's loss arrives here, after on_epoch_end.
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            if args.logging_strategy == "steps":
                self.steps.append(dict(logs))
                return
            self.write(state, logs)

        def write(self, state, logs: dict) -> dict:
            check_finite(logs["loss"], f"the training loss in epoch {round(float(state.epoch))}", "--lr")
            row = {"epoch": round(float(state.epoch)), "train_loss": float(logs["loss"]),
                   "lr": float(logs.get("learning_rate", 0.0)), "step": state.global_step}
            if "grad_norm" in logs:
                row["grad_norm"] = float(logs["grad_norm"])
            if self.val_acc is not None:
                row["val_acc"] = self.val_acc
                self.val_acc = None
            self.history = [h for h in self.history if h["epoch"] != row["epoch"]] + [row]
            write_text(log_path, "".join(json.dumps(h) + "\n" for h in self.history))
            save_curves_png([{k: h[k] for k in ("epoch", "train_loss", "val_acc") if k in h} for h in self.history],
                            curves_path, "stage 1: instruction tuning")
            print(json.dumps(row))
            return row

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


def gradient_checkpointing(choice: str | None, on_gpu: bool) -> bool:
    """``--gradient_checkpointing``: ``on``, ``off``, or ``auto`` (None too): on where CUDA trains,
    as the reference run, off on CPU."""
    return on_gpu if choice in (None, "auto") else choice == "on"


def trainer_settings(args, trainer_dir: str | Path, on_gpu: bool) -> dict:
    """The Trainer's keyword arguments from the stage-1 flags (paper defaults). On a GPU, as the
    reference run: bf16, gradient checkpointing (``--gradient_checkpointing``), the fused AdamW
    kernel and TF32 matmuls (where the GPU has them); on CPU the plain AdamW in float32."""
    checkpointing = gradient_checkpointing(getattr(args, "gradient_checkpointing", None), on_gpu)
    tf32 = on_gpu and tf32_supported()
    if on_gpu and not tf32:
        log.warning("this GPU has no TF32 matmuls (it needs compute capability 8.0 or newer); training without")
    settings = dict(
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
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
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
    return {**settings, **trainer_reporting(args)}  # --report_to: the Trainer's tracker integrations


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
