"""Stage 2: fine-tune the ViT teacher, then distil it into a small head on the VLM's frozen visual encoder.

Writes the teacher to ``<output_dir>/<dataname>/teacher/`` and the head, its metrics and the
feature cache to ``<output_dir>/<dataname>/distill/``. Needs stage 1's folder for its class
names and base VLM. A trained teacher for the same classes is reused; the frozen features and
teacher logits are computed once and cached.

    python train_distillation.py --dataname emoset --gpu 1
    python train_distillation.py --dataname emoset --teacher_checkpoint my_vit.pt   # reuse a teacher
    torchrun --nproc_per_node 4 train_distillation.py --dataname emoset   # teacher data-parallel, features sharded (or accelerate launch)
    python train_distillation.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_distill.yaml
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from data.datasets import REFERENCE_PRE_RESIZE, load_dataset
from engine.distill import TEACHER_PRECISIONS, train_heads, train_teacher
from engine.features import FEATURE_DTYPES, cached_teacher_logits, cached_vlm_features
from models.heads import HEAD_FILE, head_logits, save_head
from models.teacher import (DEFAULT_TEACHER, build_teacher, data_config, default_img_size, read_teacher_checkpoint,
                            save_teacher)
from models.vlm import vision_hidden_size
from utils.cache import image_list_id
from utils.checkpoints import file_id, verify_file
from utils.cli import add_base_vlm_flag, add_report_to_flag, base_parser, parse_args, stage_dir
from utils.dist import barrier, distributed_rank, init_distributed, leave_process_group, training_device
from utils.errors import run_cli
from utils.metrics import classification_metrics, save_curves_png, write_metrics
from utils.outputs import DivergedError, StagedOutput, lock_folder, publish, releases_locks
from utils.records import DistillRecord, TeacherRecord, VLMRecord
from utils.run import record_run, seed_everything
from utils.sweeps import RUNS, as_list, default_setting, run_name, settings
from utils.tracking import tracked

# What each numeric flag must be (utils.cli.check_flags; the shared flags are checked too).
FLAG_RULES = {"feature_batch_size": "count", "teacher_img_size": "count", "teacher_lr": "positive",
              "teacher_weight_decay": "nonnegative", "teacher_batch_size": "count", "teacher_epochs": "count",
              "depth": "index", "alpha": "fraction", "temperature": "positive", "lr": "positive",
              "weight_decay": "nonnegative", "epochs": "count", "seeds": "seed", "pre_resize": "index"}


def get_args_parser():
    parser = base_parser("Stage 2: ViT teacher and the distilled head on the VLM's frozen visual features.",
                         batch_size=1)
    model = parser.add_argument_group("frozen VLM features")
    add_base_vlm_flag(model)
    model.add_argument("--feature_batch_size", type=int, default=8,
                       help="images per batch of the frozen passes (visual encoder, teacher logits)")
    model.add_argument("--feature_dtype", choices=list(FEATURE_DTYPES), default="fp32",
                       help="the dtype the frozen visual encoder runs in: fp32 (the reference code's, on every "
                            "device) or bf16 (a faster pass on CUDA); recorded with the head, which stage 3, the "
                            "demo and predict.py follow")
    model.add_argument("--pre_resize", type=int, default=REFERENCE_PRE_RESIZE,
                       help="each image's longer side is first shrunk to this many px (LANCZOS, aspect kept), as "
                            "the reference code does, then the processor applies its pixel budget; 0: the "
                            "processor's resize alone; recorded with the head, which stage 3, the demo and "
                            "predict.py follow (the teacher's input is not affected)")
    teacher = parser.add_argument_group("teacher (timm)")
    teacher.add_argument("--teacher_model", default=DEFAULT_TEACHER, help="timm model name")
    teacher.add_argument("--no_teacher_pretrained", action="store_true", help="train the teacher from scratch")
    teacher.add_argument("--teacher_img_size", type=int, default=None,
                         help="teacher input size (default: the timm checkpoint's own, 384 for the default)")
    teacher.add_argument("--teacher_checkpoint", default=None,
                         help="use this trained teacher.pt (from this script) instead of training one")
    teacher.add_argument("--retrain_teacher", action="store_true",
                         help="train a new teacher even if <output_dir>/<dataname>/teacher/ holds one")
    teacher.add_argument("--teacher_lr", type=float, default=3e-5)
    teacher.add_argument("--teacher_weight_decay", type=float, default=1e-5)
    teacher.add_argument("--teacher_batch_size", type=int, default=10)
    teacher.add_argument("--teacher_epochs", type=int, default=10)
    teacher.add_argument("--teacher_precision", choices=TEACHER_PRECISIONS, default="fp32",
                         help="fp32 (the reference code's) or bf16: the teacher's forward passes under torch.autocast "
                              "in bfloat16 (for CUDA; on the CPU torch's CPU autocast, usually slower)")
    head = parser.add_argument_group("distillation head (--batch_size is its mini-batch)")
    head.add_argument("--depth", type=int, nargs="+", default=[1], choices=range(6),
                      help="hidden layers, widths [1024, 512, 256, 128, 64][:depth]; several values: "
                           "one head per value (a sweep, each kept in distill/runs/)")
    head.add_argument("--alpha", type=float, nargs="+", default=[0.5],
                      help="weight of the distillation (KL) term; several values: one head per value")
    head.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="train each head once per seed (default: --seed); tables show mean and std")
    head.add_argument("--temperature", type=float, default=2.0)
    head.add_argument("--lr", type=float, default=1e-5)
    head.add_argument("--weight_decay", type=float, default=1e-4)
    head.add_argument("--epochs", "--epoch", dest="epochs", type=int, default=5)
    head.add_argument("--reshuffle", action="store_true",
                      help="visit the training images in a new order each epoch (ours); default: one seeded "
                           "shuffle kept for every epoch, as the reference code iterates its once-shuffled list "
                           "(recorded in each head run's run.json and metrics.json)")
    head.add_argument("--standardize_features", action="store_true",
                      help="standardise features with the training mean/std (saved in the head)")
    add_report_to_flag(parser)
    return parser


def split_ids(splits) -> dict:
    """Identities of the images a teacher is trained and selected on (a changed split changes them)."""
    return {"train_images": image_list_id(splits.data_root, splits.train),
            "val_images": image_list_id(splits.data_root, splits.val)}


def existing_teacher(args, splits, folder: Path) -> Path | None:
    """``teacher/teacher.pt`` when it fits this run; a teacher for other classes, another model or
    other training images is refused, and so is a teacher.pt that is not the one meta.json's
    ``teacher_id`` names (damaged)."""
    path = folder / "teacher.pt"
    if args.retrain_teacher or not (folder / "meta.json").is_file() or not path.is_file():
        return None
    teacher_record = TeacherRecord.load(folder, args.dataname)
    size = args.teacher_img_size or default_img_size(args.teacher_model)
    teacher_record.check_reusable(folder, splits.class_names, args.teacher_model, size, split_ids(splits))
    verify_file(path, teacher_record.teacher_id, "teacher_id", folder / "meta.json", "teacher", args.dataname)
    return path


def fit_teacher(args, splits, folder: Path, device) -> Path:
    """Fine-tune the stage's own teacher into ``folder/teacher.pt`` (with its run record and
    meta.json), staged so the old teacher stays until the new one is complete. Under a launcher
    every process trains it (data-parallel); rank 0 writes."""
    rank, world = init_distributed()
    staged = StagedOutput(folder) if rank == 0 else None  # the old teacher stays until the new one is complete
    new_dir = staged.begin() if staged is not None else None
    pretrained = not args.no_teacher_pretrained
    model = build_teacher(args.teacher_model, len(splits.class_names), args.teacher_img_size, pretrained)
    config = data_config(model, args.teacher_img_size)
    size = config["input_size"][-1]
    if rank == 0:
        print(f"training teacher {args.teacher_model} ({'pretrained' if pretrained else 'from scratch'}, {size} px, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) for {args.teacher_epochs} epochs")
    result = train_teacher(model, splits, config, device, args.teacher_epochs, args.teacher_lr,
                           args.teacher_weight_decay, args.teacher_batch_size, args.num_workers, args.seed, new_dir,
                           precision=args.teacher_precision)
    if rank != 0:
        return folder / "teacher.pt"
    path = save_teacher(new_dir / "teacher.pt", model, args.teacher_model, size, splits.class_names, config,
                        pretrained, result.best_val_acc, result.best_epoch)
    record_run(new_dir, args, processes=world)
    TeacherRecord(class_names=splits.class_names, model=args.teacher_model, img_size=size, pretrained=pretrained,
                  teacher_id=file_id(path), best_val_acc=result.best_val_acc, epoch=result.best_epoch,
                  **split_ids(splits)).write(new_dir)
    staged.commit([("the teacher's final training loss", result.history[-1]["train_loss"])], "--teacher_lr")
    path = folder / "teacher.pt"
    print(f"teacher: best val acc {result.best_val_acc:.4f} at epoch {result.best_epoch} -> {path}")
    return path


def teacher_checkpoint(args, splits, device, rank: int) -> Path:
    """The teacher to distil: --teacher_checkpoint, the stage's own trained one, or a new one (trained
    by every process, data-parallel; rank 0 writes it)."""
    if args.teacher_checkpoint:
        path = Path(args.teacher_checkpoint)
        read_teacher_checkpoint(path, splits.class_names, args.dataname)  # refuses a missing file or other classes now
        return path
    folder = stage_dir(args, "teacher")
    if existing_teacher(args, splits, folder) is not None:
        if rank == 0:
            print(f"reusing the trained teacher in {folder}; --retrain_teacher replaces it")
    else:
        fit_teacher(args, splits, folder, device)
    barrier()
    return folder / "teacher.pt"


@releases_locks
@tracked("distill")
def main(args) -> None:
    """Stage 2 on parsed flags: the teacher, the cached frozen passes, then the heads of the sweep."""
    depths, alphas = as_list(args.depth), as_list(args.alpha)
    seeds = as_list(args.seeds) if args.seeds is not None else [args.seed]
    # Under a launcher only the first process reports progress.
    logging.basicConfig(level=logging.INFO if distributed_rank()[0] == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    seed_everything(args.seed)
    vlm_dir = stage_dir(args, "vlm")
    vlm_record = VLMRecord.load(vlm_dir, args.dataname)
    splits = load_dataset(args.data_root, args.dataname, args.output_dir, args.skip_bad_images)
    vlm_record.check_run(vlm_dir, class_names=splits.class_names, base_model=args.vlm_model)
    # One run per folder, until main returns (utils.outputs.releases_locks).
    lock_folder(*([] if args.teacher_checkpoint else [stage_dir(args, "teacher")]), stage_dir(args, "distill"))
    base_model = args.vlm_model or vlm_record.base_model
    # Recorded in each run's run.json, whose args hold what was given.
    resolved = {"vlm_model": base_model, "depth": depths, "alpha": alphas, "seeds": seeds}
    rank, world = init_distributed()
    if rank == 0:
        print(splits.summary() + (f"; {world} processes" if world > 1 else ""))
    device = training_device(args.gpu)
    out_dir = stage_dir(args, "distill")
    cache_dir = out_dir / "cache"

    teacher_path = teacher_checkpoint(args, splits, device, rank)
    # The head's pixel budget must be the one stage 1 (and so stage 3 and the demo) use.
    pixels = {"min_pixels": vlm_record.min_pixels, "max_pixels": vlm_record.max_pixels}
    # Recorded so stage 3 asks the cache for exactly these features, whatever its own device.
    dtype = FEATURE_DTYPES[args.feature_dtype]
    encoding = {**pixels, "feature_dtype": str(dtype), "pre_resize": args.pre_resize}
    features = cached_vlm_features(splits, base_model, pixels, device, args.feature_batch_size, cache_dir,
                                   args.num_workers, dtype=dtype, pre_resize=args.pre_resize)
    teacher_logits = cached_teacher_logits(splits, teacher_path, device, args.feature_batch_size, cache_dir,
                                           args.num_workers)
    leave_process_group()  # the rest (head training, metrics) is rank 0's alone
    if rank != 0:
        return
    labels = {split: torch.tensor([s.label for s in splits.split(split)]) for split in features}
    teacher_test = classification_metrics(labels["test"], teacher_logits["test"].argmax(-1), splits.class_names)
    if not args.teacher_checkpoint:  # the stage's own teacher: its test metrics live beside it
        write_metrics(teacher_path.parent, {"dataset": args.dataname, "split": "test", **teacher_test},
                      f"{args.dataname}: teacher {args.teacher_model}")
        print(f"teacher test accuracy {teacher_test['accuracy']:.4f}")

    in_dim = vision_hidden_size(AutoConfig.from_pretrained(base_model))
    sweep = settings(depths, alphas, seeds)
    if len(sweep) > 1:
        print(f"sweep: {len(sweep)} heads on the cached features, trained together as one ensemble "
              f"({', '.join(run_name(**s) for s in sweep)})")
    inputs = {"features": features, "teacher_logits": teacher_logits, "labels": labels,
              "teacher_test": teacher_test, "teacher_path": teacher_path,
              "teacher_id": file_id(teacher_path),  # hashed once for every head of a sweep
              "encoding": encoding, "adapter_id": vlm_record.adapter_id, "base_model": base_model,
              "resolved": resolved, "in_dim": in_dim, "world": world, "device": device}
    train_sweep(args, sweep, splits.class_names, out_dir, inputs)
    default = default_setting(depths, alphas, seeds)
    if default is not None:
        publish(out_dir / RUNS / run_name(**default), out_dir)
        print(f"default head (stage 3, demo): {run_name(**default)} -> {out_dir}")
    else:
        print(f"the default head in {out_dir} is unchanged (the sweep has no depth 1, alpha 0.5); fuse a run with "
              f"`python train_gate.py --dataname {args.dataname} --head depth=..,alpha=..`")


def train_sweep(args, sweep: list[dict], class_names, out_dir: Path, inputs: dict) -> list[Path]:
    """Train the heads of every (depth, alpha, seed) setting of ``sweep`` together, as one ensemble
    (engine.distill.train_heads: each head exactly as it trains alone), each into its own
    ``distill/runs/<setting>/`` with its checkpoint, metrics.json, curves, log and run record,
    swapped in (meta.json last) once finite. A head whose loss turns non-finite stops alone: the
    others are still kept, then its DivergedError is raised."""
    names = [run_name(**setting) for setting in sweep]
    staged = [StagedOutput(out_dir / RUNS / name) for name in names]  # a run's old head stays until the new one is complete
    run_dirs = [stage.begin() for stage in staged]
    features, teacher_logits, labels = inputs["features"], inputs["teacher_logits"], inputs["labels"]
    results = train_heads(features, teacher_logits, labels, inputs["in_dim"], len(class_names), sweep,
                          epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                          temperature=args.temperature, standardize=args.standardize_features,
                          device=inputs["device"], log_paths=[run_dir / "log.txt" for run_dir in run_dirs],
                          names=["head" if len(sweep) == 1 else f"head ({name})" for name in names],
                          reshuffle=args.reshuffle)
    diverged = next((result for result in results if isinstance(result, DivergedError)), None)
    folders = [write_head_run(args, setting, class_names, stage, result, inputs)
               for setting, stage, result in zip(sweep, staged, results) if not isinstance(result, DivergedError)]
    if diverged is not None:
        raise diverged
    return folders


def write_head_run(args, setting: dict, class_names, staged: StagedOutput, result, inputs: dict) -> Path:
    """One trained head of a sweep into its staged run folder, then swapped in."""
    name = run_name(**setting)
    run_dir = staged.staging
    features, teacher_logits, labels = inputs["features"], inputs["teacher_logits"], inputs["labels"]
    teacher_test, teacher_path, teacher_id = inputs["teacher_test"], inputs["teacher_path"], inputs["teacher_id"]
    in_dim = inputs["in_dim"]
    head = result.model
    save_curves_png(result.history, run_dir / "curves.png", f"stage 2: distillation head ({name})")
    head_path = save_head(run_dir / HEAD_FILE, head, class_names, base_model=inputs["base_model"],
                          teacher_id=teacher_id, best_val_acc=result.best_val_acc, epoch=result.best_epoch,
                          standardized=args.standardize_features, alpha=setting["alpha"], seed=setting["seed"],
                          **inputs["encoding"])

    head_pred = head_logits(head, features["test"]).argmax(-1)
    head_test = classification_metrics(labels["test"], head_pred, class_names)
    agreement = (head_pred == teacher_logits["test"].argmax(-1)).float().mean().item()
    write_metrics(run_dir, {"dataset": args.dataname, "split": "test", **head_test, **setting, "run": name,
                            "best_val_acc": result.best_val_acc, "teacher_accuracy": teacher_test["accuracy"],
                            "agreement": agreement, "reshuffle": args.reshuffle, "teacher": teacher_test},
                  f"{args.dataname}: distilled head ({name})")
    run_args = argparse.Namespace(**{**vars(args), **setting})  # this run's own depth, alpha and seed
    record_run(run_dir, run_args, in_dim=in_dim, processes=inputs["world"], run=name, resolved=inputs["resolved"])
    DistillRecord(class_names=class_names, base_model=inputs["base_model"], head_id=file_id(head_path),
                  teacher_id=teacher_id, teacher_checkpoint=str(teacher_path), adapter_id=inputs["adapter_id"],
                  in_dim=in_dim, run=name, **setting, **inputs["encoding"]).write(run_dir)
    staged.commit([(f"the head's final training loss ({name})", result.history[-1]["train_loss"])],
                  "--lr (or --temperature)")
    print(f"head {name} ({setting['depth']} hidden layer(s), {in_dim}-d input): best val acc "
          f"{result.best_val_acc:.4f} at epoch {result.best_epoch}; test accuracy {head_test['accuracy']:.4f}, "
          f"teacher {teacher_test['accuracy']:.4f}, agreement {agreement:.4f} -> {staged.folder}")
    return staged.folder


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule checked."""
    return parse_args(get_args_parser(), argv, FLAG_RULES)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
