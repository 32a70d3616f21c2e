"""Stage 2: fine-tune the ViT teacher, then distil it into a small head on the VLM's frozen visual encoder.

Writes the teacher to ``<output_dir>/<dataname>/teacher/`` and the head, its metrics and the
feature cache to ``<output_dir>/<dataname>/distill/``. ``--teacher_model A B C`` trains one teacher
per model side by side (the first in ``teacher/``, each further one in ``teachers/<name>/``) and
distils heads from each (the further ones' runs named ``teacher=<name>,depth=..``). Needs stage
1's folder for its class names and base VLM. A trained teacher for the same classes is reused; the frozen features and
teacher logits are computed once and cached.

    python train_distillation.py --dataname emoset --gpu 1
    python train_distillation.py --dataname emoset --teacher_checkpoint my_vit.pt   # reuse a teacher
    python train_distillation.py --dataname emoset --teacher_model vit_base_patch16_384.orig_in21k_ft_in1k vgg16 resnet50
    torchrun --nproc_per_node 4 train_distillation.py --dataname emoset   # teacher data-parallel, features sharded (or accelerate launch)
    python train_distillation.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_distill.yaml
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from data.datasets import REFERENCE_PRE_RESIZE, load_dataset
from engine.distill import TEACHER_PRECISIONS, train_heads, train_teacher
from engine.features import FEATURE_DTYPES, cached_teacher_logits, cached_vlm_features
from models.heads import HEAD_FILE, head_logits, save_head
from models.teacher import (DEFAULT_TEACHER, PREPROCESSING, build_teacher, check_teacher_name, data_config,
                            default_img_size, read_teacher_checkpoint, save_teacher)
from models.vlm import vision_hidden_size
from utils.cache import image_list_id
from utils.checkpoints import file_id, verify_file
from utils.cli import add_base_vlm_flag, add_report_to_flag, base_parser, parse_args, stage_dir
from utils.dist import barrier, distributed_rank, init_distributed, leave_process_group, training_device
from utils.errors import UserError, run_cli
from utils.metrics import classification_metrics, save_curves_png, write_metrics
from utils.outputs import DivergedError, StagedOutput, lock_folder, publish, releases_locks
from utils.records import DistillRecord, TeacherRecord, VLMRecord
from utils.run import record_run, seed_everything
from utils.stats import bootstrap_ci, correctness
from utils.sweeps import RUNS, as_list, default_setting, run_name, settings, teacher_cache, teacher_folder
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
    teacher.add_argument("--teacher_model", nargs="+", default=[DEFAULT_TEACHER],
                         help="timm model name; several: one teacher per model side by side (the first in "
                              "teacher/, the others in teachers/<name>/) and heads distilled from each (the "
                              "others' runs named teacher=<name>,depth=..), the teacher ablation")
    teacher.add_argument("--teacher_data_config", choices=PREPROCESSING, default="reference",
                         help="the teachers' preprocessing: reference (the authors' for every teacher: 384 px, "
                              "mean and std 0.5, bilinear) or timm (each checkpoint's own pretrained data config: "
                              "its size, mean/std, interpolation, crop); recorded in the teacher's meta.json")
    teacher.add_argument("--no_teacher_pretrained", action="store_true", help="train the teacher from scratch")
    teacher.add_argument("--teacher_img_size", type=int, default=None,
                         help="teacher input size (default: 384, the reference's; with --teacher_data_config "
                              "timm the checkpoint's own)")
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


@dataclass(frozen=True)
class Teacher:
    """One teacher of ``--teacher_model``: the first is the stage's own (``name`` None: ``teacher/``,
    its logits in ``distill/cache``, its heads' runs ``depth=..,alpha=..,seed=..``, the default head
    among them); each further one is named as given, with its own folder, cache and run names."""
    model: str
    name: str | None
    folder: Path
    cache_dir: Path


def teachers_of(args) -> list[Teacher]:
    """The teachers of ``--teacher_model``, in the order given (duplicates dropped)."""
    dataset_dir, cache_dir = stage_dir(args, "distill").parent, stage_dir(args, "distill") / "cache"
    names = [None if i == 0 else model for i, model in enumerate(as_list(args.teacher_model))]
    return [Teacher(model, name, teacher_folder(dataset_dir, name), teacher_cache(cache_dir, name))
            for model, name in zip(as_list(args.teacher_model), names)]


def teacher_size(args, model: str) -> int:
    """The teacher's input size: --teacher_img_size, else its preprocessing's default (384 px)."""
    return args.teacher_img_size or default_img_size(model, args.teacher_data_config)


def existing_teacher(args, splits, teacher: Teacher) -> Path | None:
    """``teacher.pt`` in the teacher's folder when it fits this run; a teacher for other classes,
    another model, size or preprocessing, or other training images is refused, and so is a
    teacher.pt that is not the one meta.json's ``teacher_id`` names (damaged)."""
    folder = teacher.folder
    path = folder / "teacher.pt"
    if args.retrain_teacher or not (folder / "meta.json").is_file() or not path.is_file():
        return None
    teacher_record = TeacherRecord.load(folder, args.dataname)
    teacher_record.check_reusable(folder, splits.class_names, teacher.model, teacher_size(args, teacher.model),
                                  split_ids(splits), args.teacher_data_config)
    verify_file(path, teacher_record.teacher_id, "teacher_id", folder / "meta.json", "teacher", args.dataname)
    return path


def fit_teacher(args, splits, teacher: Teacher, device) -> Path:
    """Fine-tune one teacher into ``<its folder>/teacher.pt`` (with its run record and meta.json),
    staged so the old teacher stays until the new one is complete. Under a launcher every process
    trains it (data-parallel); rank 0 writes."""
    folder = teacher.folder
    rank, world = init_distributed()
    staged = StagedOutput(folder) if rank == 0 else None  # the old teacher stays until the new one is complete
    new_dir = staged.begin() if staged is not None else None
    pretrained = not args.no_teacher_pretrained
    size = teacher_size(args, teacher.model)
    model = build_teacher(teacher.model, len(splits.class_names), size, pretrained)
    config = data_config(model, size, args.teacher_data_config)
    if rank == 0:
        print(f"training teacher {teacher.model} ({'pretrained' if pretrained else 'from scratch'}, {size} px, "
              f"{args.teacher_data_config} preprocessing, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"parameters) for {args.teacher_epochs} epochs")
    result = train_teacher(model, splits, config, device, args.teacher_epochs, args.teacher_lr,
                           args.teacher_weight_decay, args.teacher_batch_size, args.num_workers, args.seed, new_dir,
                           precision=args.teacher_precision)
    if rank != 0:
        return folder / "teacher.pt"
    path = save_teacher(new_dir / "teacher.pt", model, teacher.model, size, splits.class_names, config,
                        pretrained, result.best_val_acc, result.best_epoch)
    record_run(new_dir, argparse.Namespace(**{**vars(args), "teacher_model": teacher.model}), processes=world)
    TeacherRecord(class_names=splits.class_names, model=teacher.model, img_size=size, pretrained=pretrained,
                  teacher_id=file_id(path), best_val_acc=result.best_val_acc, epoch=result.best_epoch,
                  preprocessing=args.teacher_data_config, data_config=dict(config), **split_ids(splits)).write(new_dir)
    staged.commit([("the teacher's final training loss", result.history[-1]["train_loss"])], "--teacher_lr")
    path = folder / "teacher.pt"
    print(f"teacher: best val acc {result.best_val_acc:.4f} at epoch {result.best_epoch} -> {path}")
    return path


def teacher_checkpoint(args, splits, teacher: Teacher, device, rank: int) -> Path:
    """The teacher to distil: --teacher_checkpoint, the teacher's trained one, or a new one (trained
    by every process, data-parallel; rank 0 writes it)."""
    if args.teacher_checkpoint:
        path = Path(args.teacher_checkpoint)
        read_teacher_checkpoint(path, splits.class_names, args.dataname)  # refuses a missing file or other classes now
        return path
    if existing_teacher(args, splits, teacher) is not None:
        if rank == 0:
            print(f"reusing the trained teacher in {teacher.folder}; --retrain_teacher replaces it")
    else:
        fit_teacher(args, splits, teacher, device)
    barrier()
    return teacher.folder / "teacher.pt"


def teacher_test_metrics(args, splits, teacher: Teacher, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """The teacher's test metrics from its cached logits, with the 95% bootstrap interval of its
    accuracy; the stage's own teachers (not --teacher_checkpoint) get them in their folder's metrics.json."""
    predictions = logits.argmax(-1)
    metrics = classification_metrics(labels, predictions, splits.class_names)
    metrics["ci95"] = list(bootstrap_ci(correctness(labels.tolist(), predictions.tolist())))
    if not args.teacher_checkpoint:  # the stage's own teacher: its test metrics live beside it
        write_metrics(teacher.folder, {"dataset": args.dataname, "split": "test", "model": teacher.model,
                                       "preprocessing": args.teacher_data_config, **metrics},
                      f"{args.dataname}: teacher {teacher.model}")
    print(f"teacher {teacher.model} test accuracy {metrics['accuracy']:.4f}")
    return metrics


@releases_locks
@tracked("distill")
def main(args) -> None:
    """Stage 2 on parsed flags: the teachers, the cached frozen passes, then each teacher's heads of the sweep."""
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
    teachers = teachers_of(args)
    # One run per folder, until main returns (utils.outputs.releases_locks).
    lock_folder(*([] if args.teacher_checkpoint else [teacher.folder for teacher in teachers]),
                stage_dir(args, "distill"))
    base_model = args.vlm_model or vlm_record.base_model
    # Recorded in each run's run.json, whose args hold what was given.
    resolved = {"vlm_model": base_model, "depth": depths, "alpha": alphas, "seeds": seeds}
    rank, world = init_distributed()
    if rank == 0:
        print(splits.summary() + (f"; {world} processes" if world > 1 else ""))
    device = training_device(args.gpu)
    out_dir = stage_dir(args, "distill")
    cache_dir = out_dir / "cache"

    teacher_paths = [teacher_checkpoint(args, splits, teacher, device, rank) for teacher in teachers]
    # The head's pixel budget must be the one stage 1 (and so stage 3 and the demo) use.
    pixels = {"min_pixels": vlm_record.min_pixels, "max_pixels": vlm_record.max_pixels}
    # Recorded so stage 3 asks the cache for exactly these features, whatever its own device.
    dtype = FEATURE_DTYPES[args.feature_dtype]
    encoding = {**pixels, "feature_dtype": str(dtype), "pre_resize": args.pre_resize}
    features = cached_vlm_features(splits, base_model, pixels, device, args.feature_batch_size, cache_dir,
                                   args.num_workers, dtype=dtype, pre_resize=args.pre_resize)
    # Each teacher's logits in its own cache folder (stage 3 reads them there: utils.sweeps.teacher_cache).
    all_logits = [cached_teacher_logits(splits, path, device, args.feature_batch_size, teacher.cache_dir,
                                        args.num_workers) for teacher, path in zip(teachers, teacher_paths)]
    leave_process_group()  # the rest (head training, metrics) is rank 0's alone
    if rank != 0:
        return
    labels = {split: torch.tensor([s.label for s in splits.split(split)]) for split in features}
    in_dim = vision_hidden_size(AutoConfig.from_pretrained(base_model))
    sweep = settings(depths, alphas, seeds)
    diverged = None
    for teacher, teacher_path, teacher_logits in zip(teachers, teacher_paths, all_logits):
        teacher_test = teacher_test_metrics(args, splits, teacher, teacher_logits["test"], labels["test"])
        # A further teacher's heads carry its name (runs teacher=<name>,depth=..; DistillRecord.teacher).
        own = [{"teacher": teacher.name, **setting} if teacher.name else setting for setting in sweep]
        if len(own) > 1:
            print(f"sweep: {len(own)} heads on the cached features, trained together as one ensemble "
                  f"({', '.join(run_name(**s) for s in own)})")
        inputs = {"features": features, "teacher_logits": teacher_logits, "labels": labels,
                  "teacher_test": teacher_test, "teacher_path": teacher_path, "teacher_model": teacher.model,
                  "teacher_id": file_id(teacher_path),  # hashed once for every head of a sweep
                  "encoding": encoding, "adapter_id": vlm_record.adapter_id, "base_model": base_model,
                  "resolved": resolved, "in_dim": in_dim, "world": world, "device": device}
        try:
            train_sweep(args, own, splits.class_names, out_dir, inputs)
        except DivergedError as err:  # the other teachers' heads are still trained and kept
            diverged = diverged or err
    if diverged is not None:
        raise diverged
    default = default_setting(depths, alphas, seeds)  # a head of the first teacher (the stage's own)
    if default is not None:
        publish(out_dir / RUNS / run_name(**default), out_dir)
        print(f"default head (stage 3, demo): {run_name(**default)} -> {out_dir}")
    else:
        print(f"the default head in {out_dir} is unchanged (the sweep has no depth 1, alpha 0.5); fuse a run with "
              f"`python train_gate.py --dataname {args.dataname} --head depth=..,alpha=..`")


def train_sweep(args, sweep: list[dict], class_names, out_dir: Path, inputs: dict) -> list[Path]:
    """Train the heads of every (depth, alpha, seed) setting of ``sweep`` (with ``teacher``: the
    further teacher's name, for its run names) on one teacher's logits together, as one ensemble
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
    head_test["ci95"] = list(bootstrap_ci(correctness(labels["test"].tolist(), head_pred.tolist())))
    # "teacher" holds the teacher's test metrics (stage 3's teacher row); the run's teacher is "teacher_model".
    numbers = {key: value for key, value in setting.items() if key != "teacher"}
    write_metrics(run_dir, {"dataset": args.dataname, "split": "test", **head_test, **numbers, "run": name,
                            "teacher_model": inputs["teacher_model"], "best_val_acc": result.best_val_acc,
                            "teacher_accuracy": teacher_test["accuracy"], "agreement": agreement,
                            "reshuffle": args.reshuffle, "teacher": teacher_test},
                  f"{args.dataname}: distilled head ({name})")
    # This run's own depth, alpha, seed and teacher.
    run_args = argparse.Namespace(**{**vars(args), **numbers, "teacher_model": inputs["teacher_model"]})
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


def check_args(args) -> None:
    """The rules across flags (each flag's own range is in FLAG_RULES): every --teacher_model a timm
    model, and --teacher_checkpoint only with one."""
    models = as_list(args.teacher_model)
    for model in models:
        check_teacher_name(model)
    if args.teacher_checkpoint and len(models) > 1:
        raise UserError(f"--teacher_checkpoint distils one teacher, but --teacher_model names {len(models)}; "
                        "drop one of them")


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule and the
    rules across flags checked."""
    args = parse_args(get_args_parser(), argv, FLAG_RULES)
    check_args(args)
    return args


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
