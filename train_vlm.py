"""Stage 1: instruction-tune a Qwen2-VL-style model with LoRA/QLoRA, then evaluate it as a classifier.

Reads stage 0's ``annotations_train.jsonl`` (or, with ``--annotations``, the authors' own
instruction data, one JSON array, matched to the training images by class and file name),
trains on the categorical conversation of every training image and the observation and
reasoning ones where stage 0 wrote text (counts printed and recorded in run.json and
meta.json), with the loss on the answers only, and writes the adapter, processor, log and
``meta.json`` to ``<output_dir>/<dataname>/vlm/``.

    python train_vlm.py --dataname emoset --gpu 0                       # paper settings (QLoRA on a GPU)
    torchrun --nproc_per_node 4 train_vlm.py --dataname emoset          # data-parallel (or accelerate launch)
    python train_vlm.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_vlm.yaml
    python train_vlm.py --dataname emoset --eval_only --eval_mode generate
    python train_vlm.py --dataname abstract --annotations abstract_annotations_train.json   # the authors' data
    python train_vlm.py --dataname emoset --tasks categorical --output_dir outputs/cat_only   # one task, no stage 0
    python train_vlm.py --dataname emoset --eval_only --zero_shot --vlm_model Qwen/Qwen2-VL-7B-Instruct   # no adapter

``--tasks`` chooses the conversations trained on (default all three; recorded in meta.json);
``--eval_only --zero_shot`` evaluates the base VLM without an adapter into
``<output_dir>/<dataname>/vlm_zero_shot/<model name>/``, never touching ``vlm/``.
"""
from __future__ import annotations

import gc
import logging
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import SchedulerType

from data.annotations import ANNOTATIONS_FILE, TASKS, TEXT_TASKS, ReferenceReport, load_annotations
from data.datasets import REFERENCE_PRE_RESIZE, load_dataset
from data.prompts import PARSERS
from engine.vlm_eval import evaluate_vlm
from engine.vlm_train import (DEFAULT_TARGET_MODULES, AnswerLogitsTrainer, CheckpointRights, ConversationCollator,
                              build_examples, check_placement, checkpoint_writes, epoch_logger, example_counts,
                              gradient_checkpointing, last_checkpoint, read_history, training_arguments, val_scorer,
                              wrap_lora)
from models.backbones import backbone_for
from models.scorer import EVAL_MODES
from models.vlm import (ATTN_IMPLEMENTATIONS, DEFAULT_MAX_PIXELS, LATER_STAGES_DTYPE, LATER_STAGES_QUANT,
                        attn_implementation, check_attn_implementation, load_processor, load_trained_vlm, load_vlm,
                        resolve_quant, vlm_torch_dtype)
from utils.checkpoints import META_FILE, file_id
from utils.cli import add_report_to_flag, base_parser, parse_args, stage_dir
from utils.dist import (barrier, distributed_rank, is_main_process, leave_process_group, pin_single_gpu,
                        training_device)
from utils.errors import UserError, run_cli
from utils.io import follow_umask, names_failed_writes, write_json
from utils.outputs import StagedOutput, lock_folder, releases_locks, staging_dir
from utils.records import InstructionsRecord, VLMRecord, ZeroShotRecord, zero_shot_folder, zero_shot_name
from utils.run import record_run, seed_everything
from utils.tracking import trainer_environment

DEFAULT_VLM = "Qwen/Qwen2-VL-7B-Instruct"
ZERO_SHOT_STAGE = ZeroShotRecord.STAGE  # <output_dir>/<dataname>/vlm_zero_shot/<model name>/ (--zero_shot)
log = logging.getLogger("train_vlm")


# What each numeric flag must be (utils.cli.check_flags; the shared flags are checked too).
FLAG_RULES = {"min_pixels": "count", "max_pixels": "count", "lora_r": "count", "lora_alpha": "count",
              "lora_dropout": "fraction_open", "epochs": "count", "lr": "positive", "warmup_ratio": "fraction_open",
              "max_grad_norm": "nonnegative", "weight_decay": "nonnegative", "grad_accum": "count",
              "eval_batch_size": "count", "max_new_tokens": "count", "pre_resize": "index"}


def get_args_parser():
    parser = base_parser("Stage 1: LoRA/QLoRA instruction tuning of the VLM and its evaluation.",
                         batch_size=1)
    model = parser.add_argument_group("model")
    model.add_argument("--vlm_model", default=None,
                       help=f"hub id or local folder (default {DEFAULT_VLM}); with --eval_only only a check: it must "
                            "name the base the adapter was trained on (or that local folder, moved)")
    model.add_argument("--min_pixels", type=int, default=None, help="image pixel budget, lower bound")
    model.add_argument("--max_pixels", type=int, default=None,
                       help="image pixel budget, upper bound (fewer visual tokens, less memory); default: "
                            f"the checkpoint's own, capped at {DEFAULT_MAX_PIXELS} (1280 visual tokens)")
    model.add_argument("--quant", choices=("auto", "4bit", "none"), default="auto",
                       help="4bit: QLoRA, NF4 base with double quantisation (CUDA + bitsandbytes); "
                            "auto: 4bit on a CUDA GPU when bitsandbytes is installed, else full precision; "
                            "the test evaluation reloads the saved adapter as train_gate.py does (unquantised, "
                            "float32); with --eval_only, none|4bit overrides that")
    model.add_argument("--attn_implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                       help="the attention kernel for training (transformers' names); default: transformers' "
                            "choice (sdpa); flash_attention_2 needs CUDA and the flash-attn package. Recorded in "
                            "vlm/meta.json; the test evaluation and the later stages load with the default")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_r", type=int, default=8)
    lora.add_argument("--lora_alpha", type=int, default=8)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    lora.add_argument("--target_modules", nargs="+", default=None,
                      help="module names LoRA adapts; default: the backbone family's language-model attention "
                           f"projections ({' '.join(DEFAULT_TARGET_MODULES)} on every supported family)")
    lora.add_argument("--modules_to_save", nargs="*", default=[],
                      help="modules trained fully next to LoRA (the tiny random model needs lm_head)")
    train = parser.add_argument_group("training")
    train.add_argument("--annotations", default=None,
                       help="stage 0 output (default <output_dir>/<dataname>/instructions/annotations_train.jsonl), "
                            "or the authors' instruction data as released: one JSON array of {gpt_response, img, "
                            "img_path, label} records (told by its first character '['), matched to the training "
                            "images by class and file name; records of validation or test images are never "
                            "trained on")
    train.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="TASK",
                       help=f"the conversations trained on, any of {', '.join(TASKS)} (the paper's three by "
                            "default); categorical alone reads no instruction annotations (no stage 0 needed)")
    train.add_argument("--epochs", "--epoch", dest="epochs", type=int, default=5)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--lr_scheduler", default="constant", choices=[s.value for s in SchedulerType],
                       metavar="NAME", help="transformers scheduler name, e.g. constant, linear, cosine; constant "
                                            "with --warmup_ratio > 0 becomes constant_with_warmup")
    train.add_argument("--warmup_ratio", type=float, default=0.0,
                       help="fraction of the steps spent warming up (the reference asked for 0.03 with a constant "
                            "schedule, which transformers ignores: its run had no warm-up)")
    train.add_argument("--max_grad_norm", type=float, default=0.3)
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--grad_accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--train_on_prompt", action="store_true",
                       help="loss on every text token, not only the answers (the reference code's way)")
    train.add_argument("--gradient_checkpointing", choices=("auto", "on", "off"), default="auto",
                       help="recompute each layer's activations in the backward pass instead of keeping them "
                            "(less memory, ~30%% more compute); auto: on where CUDA trains (the reference run), "
                            "off on CPU")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in vlm/trainer/")
    add_report_to_flag(train)
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_only", action="store_true", help="evaluate the trained adapter, no training")
    evaluation.add_argument("--zero_shot", action="store_true",
                            help="with --eval_only: evaluate the base VLM (--vlm_model) without any adapter, with "
                                 "the same prompt and scorer (--eval_mode, --parser), into "
                                 f"<output_dir>/<dataname>/{ZERO_SHOT_STAGE}/<model name>/; vlm/ is not touched")
    evaluation.add_argument("--eval_mode", choices=EVAL_MODES, default="score")
    evaluation.add_argument("--eval_every_epoch", choices=("auto", "on", "off"), default="auto",
                            help="after each epoch score the validation images with the class scorer (one prompt "
                                 "forward per image) and log val_acc in log.txt and curves.png; it changes no "
                                 "weights: the last epoch is saved either way, as the reference does. auto: on "
                                 "when the dataset has validation images")
    evaluation.add_argument("--skip_eval", action="store_true", help="train only")
    evaluation.add_argument("--eval_batch_size", type=int, default=8)
    evaluation.add_argument("--pre_resize", type=int, default=REFERENCE_PRE_RESIZE,
                            help="the test images' longer side is first shrunk to this many px (LANCZOS, aspect "
                                 "kept), as the reference code and train_gate.py prepare them, then the processor "
                                 "applies its pixel budget; 0: the processor's resize alone. Training images are "
                                 "not pre-resized")
    evaluation.add_argument("--max_new_tokens", type=int, default=256,
                            help="generate mode: the most tokens decoded per answer (the reference code's 256; "
                                 "greedy decoding stops once every answer of a batch has ended)")
    evaluation.add_argument("--parser", choices=PARSERS, default="lenient",
                            help="generate mode: strict reads only {'emotion': '<class>'} as a Python literal, "
                                 "single quotes, the class as written (the reference code's reading); "
                                 "lenient also either quote, any case, a lone class word")
    return parser


def check_args(args) -> None:
    """The rules across flags (each flag's own range is in FLAG_RULES); ``args.tasks`` is put in
    the order of ``TASKS``, each once."""
    if args.min_pixels is not None and args.max_pixels is not None and args.min_pixels > args.max_pixels:
        raise UserError(f"--min_pixels {args.min_pixels} is above --max_pixels {args.max_pixels}")
    args.tasks = check_tasks(args.tasks)
    if args.annotations and not text_tasks(args.tasks):
        raise UserError(f"--annotations: --tasks {' '.join(args.tasks)} reads no instruction text; leave "
                        "--annotations out or add observation or reasoning to --tasks")
    if args.zero_shot and not args.eval_only:
        raise UserError("--zero_shot evaluates the base VLM and trains nothing; add --eval_only")


def check_tasks(tasks) -> list[str]:
    """``--tasks`` in the order of ``TASKS``, each once; an unknown name or none is a UserError."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise UserError(f"--tasks {unknown[0]}: not a task; choose from {', '.join(TASKS)}")
    if not tasks:
        raise UserError(f"--tasks: name at least one of {', '.join(TASKS)}")
    return [task for task in TASKS if task in tasks]


def text_tasks(tasks) -> list[str]:
    """The chosen tasks whose answers are stage 0's text (observation, reasoning)."""
    return [task for task in tasks if task in TEXT_TASKS]


def eval_every_epoch(choice: str, splits) -> bool:
    """``--eval_every_epoch``: ``auto`` is on when the dataset has validation images."""
    if choice == "on" and not splits.val:
        raise UserError("--eval_every_epoch on: this dataset has no validation images; lay out a val/ folder "
                        "or leave the flag out")
    return bool(splits.val) if choice == "auto" else choice == "on"


@dataclass(frozen=True)
class TrainingSettings:
    """The settings stage 1 trains with that the flags leave open (their defaults depend on the
    machine or the model): recorded in run.json under ``resolved``, and all but ``gpu`` in meta.json."""
    vlm_model: str
    quant: str | None  # "4bit" or None (full precision)
    target_modules: list[str]
    gpu: int | None  # --gpu as this process sees it (pin_single_gpu)
    attn_implementation: str | None = None  # what the model runs (transformers' choice without the flag)
    gradient_checkpointing: bool | None = None
    eval_every_epoch: bool | None = None  # the validation split scored after each epoch


def evaluate(args, model, processor, splits, out_dir: Path) -> dict:
    """The test evaluation; under torchrun every rank runs it on its share of the images."""
    model.eval()
    eval_dir = out_dir / f"eval_{args.eval_mode}"
    metrics = evaluate_vlm(model, processor, splits.data_root, splits.test, splits.class_names, eval_dir,
                           args.eval_mode, args.eval_batch_size, args.max_new_tokens,
                           title=f"{args.dataname}: VLM ({args.eval_mode})", parser=args.parser,
                           pre_resize=args.pre_resize)
    if is_main_process():
        print(f"test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
              f"unparseable {metrics['unparseable']} of {metrics['n']} -> {eval_dir}")
    return metrics


def load_for_eval(args, splits, out_dir: Path, gpu: int | None) -> tuple:
    """The saved adapter on its base, ``(model, processor)``, loaded as the later stages load it
    (unquantised, float32: LATER_STAGES_QUANT, LATER_STAGES_DTYPE), so stage 1's test accuracy is
    the VLM row of stage 3's table; with ``--eval_only``, ``--quant none|4bit`` overrides."""
    device = training_device(gpu)  # under torchrun: this rank's GPU
    quant = LATER_STAGES_QUANT if args.quant == "auto" or not args.eval_only else args.quant
    model, processor, vlm_record = load_trained_vlm(out_dir, device, args.vlm_model, quant,
                                                    vlm_torch_dtype(LATER_STAGES_DTYPE))
    vlm_record.check_run(out_dir, class_names=splits.class_names)
    return model, processor


def zero_shot_dir(args) -> Path:
    """Where ``--zero_shot`` evaluates ``--vlm_model``: beside vlm/, named after the base."""
    return zero_shot_folder(args.output_dir, args.dataname, args.vlm_model or DEFAULT_VLM)


def zero_shot(args, splits, gpu: int | None) -> dict:
    """The base VLM without an adapter, evaluated as the tuned one is (the same prompt, class scorer
    or decoding and parser, pixel budget, pre-resize, unquantised float32 unless ``--quant 4bit``)
    into :func:`zero_shot_dir`: ``eval_<mode>/`` (metrics.json marked ``zero_shot`` with its
    ``base_model``, predictions, confusion PNG), run.json, then meta.json (a ZeroShotRecord)."""
    vlm_model = args.vlm_model or DEFAULT_VLM
    folder = zero_shot_dir(args)
    config = Path(vlm_model) / "config.json"
    config_id = file_id(config) if config.is_file() else None
    if (folder / META_FILE).is_file():  # another base of the same name: never mixed into one folder
        recorded = ZeroShotRecord.load(folder, args.dataname)
        if recorded.base_model != vlm_model and (config_id is None or recorded.base_config_id != config_id):
            raise UserError(f"{folder}: holds the zero-shot evaluation of {recorded.base_model!r}, not --vlm_model "
                            f"{vlm_model}; move that folder away or pass another --output_dir")
    device = training_device(gpu)
    quant = None if args.quant in ("auto", "none") else args.quant  # auto: as the tuned VLM is evaluated
    processor = load_processor(vlm_model, args.min_pixels, args.max_pixels)  # stage 1's budget
    model = load_vlm(vlm_model, device, dtype=vlm_torch_dtype(LATER_STAGES_DTYPE), quant=quant)  # no adapter
    if is_main_process():
        print(f"zero-shot: base model {vlm_model}, no adapter -> {folder}")
    eval_dir = folder / f"eval_{args.eval_mode}"
    metrics = evaluate_vlm(model, processor, splits.data_root, splits.test, splits.class_names, eval_dir,
                           args.eval_mode, args.eval_batch_size, args.max_new_tokens,
                           title=f"{args.dataname}: zero-shot {zero_shot_name(vlm_model)} ({args.eval_mode})",
                           parser=args.parser, pre_resize=args.pre_resize,
                           record={"zero_shot": True, "base_model": vlm_model})
    if is_main_process():
        size = processor.image_processor.size
        record_run(folder, args, resolved={"vlm_model": vlm_model, "quant": quant})
        ZeroShotRecord(class_names=splits.class_names, base_model=vlm_model, base_config_id=config_id,
                       min_pixels=size.shortest_edge, max_pixels=size.longest_edge, quant=quant,
                       vlm_dtype=LATER_STAGES_DTYPE).write(folder)
        print(f"zero-shot test accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}, "
              f"unparseable {metrics['unparseable']} of {metrics['n']} -> {eval_dir}")
    return metrics


def annotations_file(args, class_names) -> Path:
    if args.annotations:
        path = Path(args.annotations)
        if not path.is_file():
            raise UserError(f"--annotations {path}: no such file")
        return path
    folder = stage_dir(args, "instructions")
    path = folder / ANNOTATIONS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no instruction annotations; run "
                        f"`python generate_instructions.py --dataname {args.dataname}` first, or train the "
                        "categorical conversation alone (--tasks categorical), which needs none")
    if (folder / META_FILE).is_file():
        InstructionsRecord.load(folder, args.dataname).check_run(folder, class_names=class_names)
    return path


def prepare_folder(args, out_dir: Path, trainer_dir: Path) -> str | None:
    """Find the checkpoint to resume from; the new results go to a staging folder beside
    ``out_dir`` (kept when resuming), so the old adapter stays trusted until they replace it."""
    checkpoint = last_checkpoint(trainer_dir) if args.resume else None
    if args.resume and checkpoint is None:
        raise UserError(f"--resume: no checkpoint in {trainer_dir}; run without --resume")
    if distributed_rank()[0] == 0:
        StagedOutput(out_dir).begin(keep=args.resume)
        if not args.resume and trainer_dir.exists():
            print(f"starting afresh: removing old checkpoints in {trainer_dir}")
            shutil.rmtree(trainer_dir)
    return checkpoint


REFERENCE_REPORT_FILE = "reference_annotations.json"


def save_outputs(args, settings: TrainingSettings, model, processor, class_names, out_dir: Path,
                 counts: dict, reference: ReferenceReport | None = None) -> None:
    """Adapter, processor, run record (and, trained on the authors' JSON, the fate of each of
    its records), then meta.json last (all staged), then swapped into ``out_dir``: only a complete
    folder has a meta.json."""
    staged = StagedOutput(out_dir)
    final_dir, out_dir = out_dir, staged.staging
    with names_failed_writes(out_dir):  # a full disk: one line naming the folder
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    follow_umask(*out_dir.glob("*.safetensors"))  # safetensors writes 0600
    size = processor.image_processor.size
    reference_counts = reference.counts() if reference is not None else None
    if reference is not None:
        write_json(out_dir / REFERENCE_REPORT_FILE, asdict(reference))
    record_run(out_dir, args, train_examples=sum(counts["conversations"].values()), counts=counts, tasks=args.tasks,
               resolved=asdict(settings), reference_annotations=reference_counts)
    # Lets a later stage accept the same local base folder after it moved.
    config = Path(settings.vlm_model) / "config.json"
    VLMRecord(class_names=class_names, base_model=settings.vlm_model,
              base_config_id=file_id(config) if config.is_file() else None,
              adapter_id=file_id(out_dir / "adapter_model.safetensors"),
              min_pixels=size.shortest_edge, max_pixels=size.longest_edge,
              modules_to_save=list(args.modules_to_save), target_modules=list(settings.target_modules),
              lora_r=args.lora_r, lora_alpha=args.lora_alpha, quant=settings.quant,
              train_on_prompt=args.train_on_prompt, epochs=args.epochs, counts=counts,
              reference_annotations=reference_counts, attn_implementation=settings.attn_implementation,
              gradient_checkpointing=settings.gradient_checkpointing,
              eval_every_epoch=settings.eval_every_epoch, tasks=list(args.tasks)).write(out_dir)
    history = read_history(out_dir / "log.txt")
    staged.commit([("the final training loss", history[-1]["train_loss"])] if history else [], "--lr")
    print(f"saved adapter and processor to {final_dir}")


def train(args, splits, out_dir: Path, gpu: int | None) -> None:
    """Instruction-tune the VLM and save the adapter (rank 0)."""
    vlm_model = args.vlm_model or DEFAULT_VLM
    path, annotations, reference = None, [], None
    if text_tasks(args.tasks):  # the categorical conversation alone needs no stage-0 text
        path = annotations_file(args, splits.class_names)
        annotations, reference = load_annotations(path, splits)
    if reference is not None and is_main_process():
        print(reference.summary(len(splits.train))
              + f"\n  (every record's fate: {out_dir / REFERENCE_REPORT_FILE} once trained)")
    if reference is None:
        examples = build_examples(annotations, splits, path, tasks=args.tasks)
    else:
        examples = build_examples(annotations, splits, path, tasks=args.tasks,
                                  missing_hint="the authors' file has no usable record for them (counted above)")
    counts = example_counts(examples, len(splits.train))
    device = training_device(gpu)
    on_gpu = device.type == "cuda"
    quant = resolve_quant(args.quant, device)
    check_attn_implementation(args.attn_implementation, device)
    validating = eval_every_epoch(args.eval_every_epoch, splits)
    checkpointing = gradient_checkpointing(args.gradient_checkpointing, on_gpu)
    print(f"base model {vlm_model}: " + ("4-bit NF4 (QLoRA)" if quant else
                                           "full precision" + (" (bf16)" if on_gpu else "")))
    processor = load_processor(vlm_model, args.min_pixels, args.max_pixels)
    size = processor.image_processor.size
    print(f"pixel budget per image: {size.shortest_edge}..{size.longest_edge} "
          f"(--min_pixels/--max_pixels)")
    model = load_vlm(vlm_model, device, dtype=torch.bfloat16 if on_gpu else None, quant=quant,
                     trainable=True, attn_implementation=args.attn_implementation)
    settings = TrainingSettings(vlm_model=vlm_model, quant=quant, gpu=gpu,
                                target_modules=list(args.target_modules or backbone_for(model).lora_targets),
                                attn_implementation=attn_implementation(model),
                                gradient_checkpointing=checkpointing, eval_every_epoch=validating)
    print(f"attention {settings.attn_implementation}; gradient checkpointing {'on' if checkpointing else 'off'}; "
          + (f"the {len(splits.val)} validation images scored after each epoch" if validating
             else "no validation after each epoch"))
    model = wrap_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, settings.target_modules,
                      args.modules_to_save, quantized=quant is not None, gradient_checkpointing=checkpointing)

    trainer_dir = out_dir / "trainer"
    checkpoint = prepare_folder(args, out_dir, trainer_dir)
    training_args = training_arguments(args, trainer_dir, on_gpu)
    check_placement(training_args, device)
    batches = -(-len(examples) // (args.batch_size * training_args.world_size))
    tasks = ", ".join(f"{number} {task}" for task, number in counts["conversations"].items() if task in args.tasks)
    texts = (f"{counts['with_text']} with stage-0 text, {counts['without_text']} without"
             + (": categorical only" if "categorical" in args.tasks else ": left out") if text_tasks(args.tasks)
             else "no stage-0 text read")
    print(f"{counts['train_images']} training images ({texts}); --tasks {' '.join(args.tasks)}: "
          f"{len(examples)} conversations ({tasks}); "
          f"effective batch "
          f"{args.batch_size * args.grad_accum * training_args.world_size} "
          f"({training_args.world_size} process(es)); ~{-(-batches // args.grad_accum)} optimizer steps per epoch"
          + (f"; resuming from {checkpoint}" if checkpoint else ""))
    staging = staging_dir(out_dir)
    validate = val_scorer(splits.val, splits.data_root, splits.class_names, processor, args.eval_batch_size,
                          args.pre_resize) if validating else None
    logger = epoch_logger(staging / "log.txt", staging / "curves.png",
                          (read_history(staging / "log.txt") or read_history(out_dir / "log.txt"))
                          if checkpoint else None, validate)
    # The output layer runs only where the loss reads it (the answers; every text token with --train_on_prompt).
    with trainer_environment(args, out_dir):  # --report_to: the Trainer's trackers write under vlm/
        trainer = AnswerLogitsTrainer(model=model, args=training_args, train_dataset=examples,
                                      data_collator=ConversationCollator(processor, args.train_on_prompt),
                                      callbacks=[logger, CheckpointRights()])
        logger.report = trainer.log  # the epoch rows to the trackers too
        with checkpoint_writes(trainer_dir):  # a checkpoint the disk cannot hold: one line naming it
            trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():  # saving is rank 0's alone
        save_outputs(args, settings, model, processor, splits.class_names, out_dir, counts, reference)


def release_memory() -> None:
    """Free what the finished training left (the Trainer's model and optimiser hold cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@releases_locks
def main(args) -> None:
    """Stage 1 on parsed flags (checked by ``parse``): lock the folder, then train (and evaluate) or only evaluate."""
    # One run per folder, until main returns; a zero-shot evaluation writes (and locks) its own, not vlm/.
    lock_folder(zero_shot_dir(args) if args.zero_shot else stage_dir(args, "vlm"))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # Before anything touches CUDA: a single process sees only its GPU (see pin_single_gpu).
    gpu = pin_single_gpu(args.gpu)
    seed_everything(args.seed)
    splits = load_dataset(args.data_root, args.dataname, args.output_dir, args.skip_bad_images)
    if distributed_rank()[0] == 0:
        print(splits.summary())
    if args.zero_shot:
        zero_shot(args, splits, gpu)  # sharded across the ranks
        leave_process_group()
        return
    out_dir = stage_dir(args, "vlm")
    if not args.eval_only:
        train(args, splits, out_dir, gpu)
        release_memory()  # the training model (its encoder, norms and lm_head in fp32 for 4-bit training)
        barrier()  # every rank reloads the folder rank 0 has saved
    if args.eval_only or not args.skip_eval:
        # The saved folder, reloaded as stage 3 and the demo load it: one test number for the VLM.
        model, processor = load_for_eval(args, splits, out_dir, gpu)
        evaluate(args, model, processor, splits, out_dir)  # sharded across the ranks
    leave_process_group()


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule and the
    rules across flags checked."""
    args = parse_args(get_args_parser(), argv, FLAG_RULES)
    check_args(args)
    return args


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
