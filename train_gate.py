"""Stage 3: train the gate that fuses the VLM's answer with the distilled head's logits.

Reads stage 1 (``<output_dir>/<dataname>/vlm/``) and stage 2 (``.../distill/``, ``.../teacher/``),
computes both frozen inputs once per image (cached), trains the gate on those tensors, keeps
the best epoch on validation and writes ``gate.pt``, ``metrics.json``, ``table.md`` and the
pictures to ``<output_dir>/<dataname>/gate/``.

    python train_gate.py --dataname emoset --gpu 0                 # the paper's gate: concat + linear
    python train_gate.py --dataname emoset --gate all              # the ablation: every variant, one table
    python train_gate.py --dataname emoset --gate_train_split val  # fit on validation: the VLM saw the train images
    python train_gate.py --dataname emoset --gate all --seeds 0 1 2   # each variant once per seed
    python train_gate.py --dataname emoset --head depth=2,alpha=0.5    # fuse another head of a stage-2 sweep
    python train_gate.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_gate.yaml
    torchrun --nproc_per_node 8 train_gate.py --dataname emoset    # VLM answers sharded; the gate trains on rank 0

With ``--gate all`` every variant is saved as ``gate_<name>.pt`` and the one best on validation
(ties: the earlier in the table, concat_linear first) also as ``gate.pt``, which the demo loads.
Every seed's outputs are also kept in ``gate/runs/<head run>/seed=<seed>/``; the top-level
``gate/`` holds the first seed's, and only when the fused head is stage 2's default head.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from data.datasets import REFERENCE_PRE_RESIZE, load_dataset
from data.prompts import PARSERS
from engine.features import read_cached_teacher_logits, read_vlm_features
from engine.fit import EpochLog
from engine.gate import GateData, gate_logits, gate_training_data, predictions, split_accuracies, train_gates
from engine.vlm_answers import cached_vlm_predictions
from models.gates import (GATE_FILE, GATE_LABELS, GATES, HEAD_SIGNALS, SIGNALS, gate_weights, head_gate_inputs,
                          save_gate, vlm_gate_inputs)
from models.heads import head_logits, load_head
from models.scorer import EVAL_MODES
from models.vlm import LATER_STAGES_DTYPE, LATER_STAGES_QUANT, VLM_DTYPES
from utils.checkpoints import META_FILE, file_id
from utils.cli import add_base_vlm_flag, add_report_to_flag, base_parser, parse_args, stage_dir
from utils.dist import init_distributed, leave_process_group, training_device
from utils.errors import UserError, run_cli
from utils.io import read_json, write_json, write_text
from utils.metrics import classification_metrics, save_confusion_png, save_curves_png
from utils.outputs import DivergedError, StagedOutput, lock_folder, publish, releases_locks
from utils.records import DistillRecord, GateProvenance, GateRecord, VLMRecord
from utils.report import complementarity_table, dataset_rows, markdown_table
from utils.run import record_run, seed_everything
from utils.stats import fusion_statistics
from utils.sweeps import RUNS, as_list, resolve_head, teacher_cache
from utils.tracking import tracked

log = logging.getLogger("train_gate")


# What each numeric flag must be (utils.cli.check_flags; the shared flags are checked too).
FLAG_RULES = {"vlm_batch_size": "count", "max_new_tokens": "count", "epochs": "count", "lr": "positive", "seeds": "seed",
              "weight_decay": "nonnegative", "pre_resize": "index"}


def get_args_parser():
    parser = base_parser("Stage 3: train the gate fusing the VLM's answer and the distilled head.",
                         batch_size=1)
    inputs = parser.add_argument_group("gate inputs")
    add_base_vlm_flag(inputs)
    inputs.add_argument("--vlm_signal", choices=SIGNALS, default="onehot",
                        help="onehot: the VLM's answer (zeros if unparseable), the paper's; "
                             "probs: its class distribution (needs --vlm_answer score)")
    inputs.add_argument("--head_signal", choices=HEAD_SIGNALS, default="logits",
                        help="what the gate is given of the distilled head: logits (the reference code's) or "
                             "probs, their softmax (the paper's text: the module's probability distribution); "
                             "recorded in gate.pt, which the demo and predict.py follow")
    inputs.add_argument("--vlm_answer", choices=EVAL_MODES, default="score",
                        help="score: most likely class answer; generate: greedy decoding, parsed")
    inputs.add_argument("--parser", choices=PARSERS, default="lenient",
                        help="--vlm_answer generate: how the decoded answer is read; strict: only the form "
                             "{'emotion': '<class>'} read as a Python literal, single quotes, the class as "
                             "written (the reference code's reading); lenient: also either quote, any case, "
                             "a lone class word")
    inputs.add_argument("--head", default=None,
                        help="the stage-2 head run to fuse, e.g. depth=2,alpha=0.5[,seed=0] (lowest seed when "
                             "omitted), teacher=vgg16,depth=1,alpha=0.5 for a further teacher's head (stage 2's "
                             "--teacher_model A B ...); default: stage 2's default head (the paper's depth 1, "
                             "alpha 0.5)")
    inputs.add_argument("--vlm_batch_size", type=int, default=8, help="images per VLM forward")
    inputs.add_argument("--max_new_tokens", type=int, default=256,
                        help="--vlm_answer generate: the most tokens decoded per answer (the reference code's 256; "
                             "greedy decoding stops once every answer of a batch has ended)")
    inputs.add_argument("--quant", choices=("4bit", "none"), default=LATER_STAGES_QUANT,
                        help="how the VLM answering is loaded: none (full precision, the reference code's) or "
                             "4bit (NF4 as stage 1's QLoRA, CUDA + bitsandbytes)")
    inputs.add_argument("--pre_resize", type=int, default=REFERENCE_PRE_RESIZE,
                        help="each image's longer side is first shrunk to this many px (LANCZOS, aspect kept), "
                             "as the reference code does, then the processor applies its pixel budget; 0: the "
                             "processor's resize alone; recorded in gate.pt, which the demo and predict.py follow")
    inputs.add_argument("--vlm_dtype", choices=list(VLM_DTYPES), default=LATER_STAGES_DTYPE,
                        help="the dtype of the VLM's weights left unquantised (all of them without --quant 4bit): "
                             "fp32 (the reference code's, ~32 GB for a 7B model) or bf16 (half that)")
    gate = parser.add_argument_group("gate (--batch_size: images per optimiser step; 1, as the reference code)")
    gate.add_argument("--gate", choices=[*GATES, "all"], default="concat_linear",
                      help="gate variant; all: train every variant and tabulate them")
    gate.add_argument("--gate_train_split", choices=("train", "val"), default="train",
                      help="train: fit on the training split, pick the epoch on validation (the paper); "
                           "val: fit on a stratified half of validation, pick the epoch on the other half "
                           "(the VLM was instruction-tuned on the training images, so its answers there "
                           "are better than on unseen ones)")
    gate.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="train every gate once per seed (default: --seed); tables show mean and std")
    gate.add_argument("--reshuffle", action="store_true",
                      help="visit the training examples in a new order each epoch (ours); default: one seeded "
                           "shuffle kept for every epoch, as the reference code iterates its once-shuffled list")
    gate.add_argument("--epochs", "--epoch", dest="epochs", type=int, default=10)
    gate.add_argument("--lr", type=float, default=1e-4)
    gate.add_argument("--weight_decay", type=float, default=1e-4)
    add_report_to_flag(parser)
    return parser


def check_args(args) -> None:
    """The rules across flags (each flag's own range is in FLAG_RULES)."""
    if args.vlm_signal == "probs" and args.vlm_answer != "score":
        raise UserError("--vlm_signal probs needs class probabilities: use --vlm_answer score")


def read_inputs(args) -> tuple[Path, VLMRecord, Path, DistillRecord]:
    """Stage 1's and the fused head's records (read before anything else: a missing stage fails at once)."""
    vlm_dir = stage_dir(args, "vlm")
    # The adapter's id keys the VLM-answer cache and is recorded in gate.pt: stage 3 needs it.
    vlm_record = VLMRecord.load(vlm_dir, args.dataname).need(vlm_dir, "adapter_id", dataname=args.dataname)
    head_dir = resolve_head(stage_dir(args, "distill"), getattr(args, "head", None))
    head_record = DistillRecord.load(head_dir, args.dataname)
    return vlm_dir, vlm_record, head_dir, head_record


def gate_inputs(args, splits, answers: dict, head, features: dict) -> dict:
    """``{split: GateData}``: the VLM's answers as the gate's VLM signal, and the frozen ``head`` on
    stage 2's cached features (exactly those it was trained on), given to the gate as
    ``--head_signal`` says."""
    num_classes = len(splits.class_names)
    data = {split: GateData(vlm_pred=answers[split].pred,
                            vlm_signal=vlm_gate_inputs(answers[split], num_classes, args.vlm_signal),
                            head_logits=head_logits(head, features[split]),
                            vlm_probs=answers[split].probs,
                            labels=torch.tensor([s.label for s in splits.split(split)], dtype=torch.long))
            for split in ("train", "val", "test")}
    if args.head_signal == "logits":  # the gate reads head_logits as they are
        return data
    return {split: replace(split_data, head_signal=head_gate_inputs(split_data.head_logits, args.head_signal))
            for split, split_data in data.items()}


def teacher_metrics(args, class_names, num_test: int, head_dir: Path | None = None) -> dict | None:
    """The test metrics of the teacher the head was distilled from (the head's metrics.json)."""
    path = (head_dir or stage_dir(args, "distill")) / "metrics.json"
    metrics = read_json(path).get("teacher") if path.is_file() else None
    if not metrics:
        return None
    if metrics.get("class_names") != list(class_names) or metrics.get("n") != num_test:
        log.warning("teacher metrics in %s are for other classes or another test split; row left out", path)
        return None
    return metrics


def gate_test_predictions(data: dict, results: dict, teacher_pred) -> dict:
    """Every model's test predictions, stored in metrics.json: the table's accuracies, intervals,
    p-values and oracle are all computed from these lists."""
    test = data["test"]
    return {"labels": test.labels.tolist(), "vlm": test.vlm_pred.tolist(),
            "head": test.head_logits.argmax(1).tolist(),
            "teacher": None if teacher_pred is None else teacher_pred.tolist(),
            "gates": {name: predictions(result.model, test).tolist() for name, result in results.items()}}


def _rounded(values: torch.Tensor) -> list:
    return [[round(float(v), 5) for v in row] for row in values.tolist()]


def gate_test_outputs(test: GateData, gate, images: list[str] | None) -> dict:
    """Per test image, what the explorer tab of demo.py shows: the image's path (relative to
    --data_root), each module's class probabilities (the VLM's in score mode only, else None) and
    the selected gate's source weights (None for gates that expose none)."""
    with torch.no_grad():
        final = gate_logits(gate, test).softmax(-1)
        device = next(gate.parameters()).device
        weights = gate_weights(gate, test.vlm_signal.to(device), test.head_input().to(device))
    return {"images": images, "vlm_probs": None if test.vlm_probs is None else _rounded(test.vlm_probs.float()),
            "head_probs": _rounded(test.head_logits.float().softmax(-1)), "final_probs": _rounded(final),
            "gate_weights": None if weights is None else
            {name: [round(float(v), 5) for v in value.cpu().tolist()] for name, value in weights.items()}}


def add_statistics(metrics: dict, preds: dict) -> None:
    """Bootstrap intervals into each accuracy's row, McNemar p-values into each gate's, and the
    complementarity counts with the oracle beside the selected gate's accuracy."""
    stats = fusion_statistics(preds["labels"], {key: value for key, value in preds.items() if key != "labels"})
    for key in ("vlm", "head", "teacher"):
        if metrics.get(key) and key in stats["ci95"]:
            metrics[key]["ci95"] = stats["ci95"][key]
    for name, row in metrics["gates"].items():
        row.update(ci95=stats["ci95"]["gates"][name], mcnemar_vs_vlm=stats["mcnemar"][name]["vs_vlm"],
                   mcnemar_vs_head=stats["mcnemar"][name]["vs_head"])
    metrics["complementarity"] = {**stats["complementarity"],
                                  "gate_accuracy": metrics["gates"][metrics["gate"]]["accuracy"]}
    metrics["bootstrap"] = stats["bootstrap"]


def write_results(args, out_dir: Path, data: dict, results: dict, selected: str, class_names,
                  provenance: GateProvenance, resolved: dict, teacher_pred=None, head_dir: Path | None = None,
                  test_images: list[str] | None = None) -> str:
    """gate.pt (and gate_<name>.pt), metrics.json, pictures, table.md, run.json; meta.json last.
    ``test_images``: the test split's image paths, in the order of the stored predictions (the
    report pairs two runs' predictions only over the same list)."""
    def save(path: Path, name: str, result) -> Path:
        return save_gate(path, name, result.model, class_names, best_val_acc=result.best_val_acc,
                         epoch=result.best_epoch, **asdict(provenance))

    if len(results) > 1:
        for name, result in results.items():
            save(out_dir / f"gate_{name}.pt", name, result)
    save(out_dir / GATE_FILE, selected, results[selected])

    preds = gate_test_predictions(data, results, teacher_pred)
    labels = preds["labels"]
    metrics = {
        "dataset": args.dataname, "split": "test", "n": len(labels), "class_names": class_names,
        "vlm": classification_metrics(labels, preds["vlm"], class_names),
        "head": classification_metrics(labels, preds["head"], class_names),
        "teacher": teacher_metrics(args, class_names, len(labels), head_dir),
        "gates": {name: {**classification_metrics(labels, preds["gates"][name], class_names),
                         "best_epoch": result.best_epoch, "val_accuracy": result.best_val_acc}
                  for name, result in results.items()},
        "gate": selected, "gate_train_split": args.gate_train_split, "reshuffle": args.reshuffle,
        "splits": split_accuracies(data),
        # Test answers no class could be read from (with --vlm_answer generate; `parser` says how).
        "vlm_unparseable": int((data["test"].vlm_pred < 0).sum()),
        "seed": args.seed, **asdict(provenance),
        "test_images": test_images,
    }
    add_statistics(metrics, preds)
    metrics["test_predictions"] = preds
    metrics["test_outputs"] = gate_test_outputs(data["test"], results[selected].model, test_images)
    write_json(out_dir / "metrics.json", metrics)
    save_confusion_png(metrics["gates"][selected]["confusion_matrix"], class_names,
                       out_dir / "confusion_matrix.png", f"{args.dataname}: EmoVLM-KD ({selected})")
    save_curves_png({name: result.history for name, result in results.items()}, out_dir / "curves.png",
                    f"{args.dataname}: gate training")
    table = markdown_table(dataset_rows(args.dataname, metrics)) + "\n\nGates: " + "; ".join(
        f"`{name}` = {GATE_LABELS[name]}" for name in results) + f". Head fused: `{provenance.head_run}`.\n\n" \
        + complementarity_table(metrics) + "\n"
    write_text(out_dir / "table.md", table)
    record_run(out_dir, args, selected_gate=selected, resolved=resolved)
    # The provenance is gate.pt's (the predictor reads it there); meta.json only names that file.
    GateRecord(class_names=class_names, gate=selected, gate_id=file_id(out_dir / GATE_FILE)).write(out_dir)
    return table


@releases_locks
@tracked("gate")
def main(args) -> None:
    """Stage 3 on parsed flags: the frozen inputs (cached), then every gate once per seed."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    seeds = as_list(args.seeds) if args.seeds is not None else [args.seed]
    seed_everything(args.seed)
    vlm_dir, vlm_record, distill_dir, head_record = read_inputs(args)
    splits = load_dataset(args.data_root, args.dataname, args.output_dir, args.skip_bad_images)
    print(splits.summary())
    # Both stages trained for these classes, stage 1 on --vlm_model, the head on stage 1's base VLM.
    vlm_record.check_run(vlm_dir, class_names=splits.class_names, base_model=args.vlm_model)
    head_record.check_run(distill_dir, class_names=splits.class_names)
    head_record.check_built_on(vlm_record, distill_dir, vlm_dir, args.dataname)
    out_dir = stage_dir(args, "gate")
    lock_folder(out_dir)  # one run per folder, until main returns (rank 0 only)
    default_head = is_default_head(args, head_record)
    rank, _ = init_distributed()  # under torchrun the VLM-answer pass is sharded across the ranks
    device = training_device(args.gpu)
    # The head and stage 2's cached features, never re-encoded (a damaged head or a stale cache fails
    # here, before the VLM runs), then the VLM's answers, cached (the VLM loaded as --quant and
    # --vlm_dtype say, the images pre-resized as --pre_resize says, all recorded in gate.pt, only
    # for a split that misses).
    head, _ = load_head(distill_dir, splits.class_names, dataname=args.dataname)
    features = read_vlm_features(splits, head_record, stage_dir(args, "distill") / "cache", device)
    answers = cached_vlm_predictions(splits, vlm_record, out_dir / "cache", vlm_dir, device, args.vlm_answer,
                                     args.vlm_batch_size, args.max_new_tokens, args.quant, parser=args.parser,
                                     vlm_dtype=args.vlm_dtype, pre_resize=args.pre_resize)
    data = gate_inputs(args, splits, answers, head, features)
    leave_process_group()  # the frozen passes are over: the gate trains on rank 0 alone
    if rank != 0:
        return

    for split, row in split_accuracies(data).items():
        print(f"{split}: VLM accuracy {row['vlm_accuracy']:.4f}, head accuracy {row['head_accuracy']:.4f} "
              f"({row['n']} images)")
    names = list(GATES) if args.gate == "all" else [args.gate]
    provenance = GateProvenance(vlm_signal=args.vlm_signal, head_signal=args.head_signal,
                                vlm_answer=args.vlm_answer, parser=args.parser,
                                max_new_tokens=args.max_new_tokens, quant=args.quant, vlm_dtype=args.vlm_dtype,
                                pre_resize=args.pre_resize, adapter_id=vlm_record.adapter_id, head_id=head_record.head_id,
                                base_model=vlm_record.base_model, head_run=head_record.run)
    resolved = {"head_run": head_record.run, "seeds": seeds}  # run.json's args hold what was given
    teacher_pred = teacher_test_predictions(args, splits, head_record)
    print(f"fusing head {head_record.run} ({distill_dir})")
    runs = []
    for seed in seeds:
        run_args = argparse.Namespace(**{**vars(args), "seed": seed})  # this run's own seed in run.json
        staged = StagedOutput(out_dir / RUNS / head_record.run / f"seed={seed}")  # swapped in once finite
        runs.append((run_args, staged, staged.begin()))
    fitted = fit_gates([run_args for run_args, _, _ in runs], names, data, len(splits.class_names), device,
                       [run_dir / "log.txt" for _, _, run_dir in runs])
    diverged = None
    for index, ((run_args, staged, run_dir), outcome) in enumerate(zip(runs, fitted)):
        if isinstance(outcome, DivergedError):  # this seed's run is not kept; the other seeds' are
            diverged = diverged or outcome
            continue
        results, selected = outcome
        seed_everything(run_args.seed)
        finite = [(f"the {name} gate's validation loss", results[name].history[-1]["val_loss"]) for name in names]
        table = write_results(run_args, run_dir, data, results, selected, splits.class_names, provenance, resolved,
                              teacher_pred, distill_dir, [sample.path for sample in splits.split("test")])
        run_dir = staged.commit(finite, "--lr")
        published = index == 0 and default_head  # the folder the demo, the predictor and the report read
        if published:
            publish(run_dir, out_dir)
        print(table)
        print(f"saved gate {selected!r} (seed {run_args.seed}: val acc {results[selected].best_val_acc:.4f} at epoch "
              f"{results[selected].best_epoch}) to {run_dir / 'gate.pt'}"
              + (f" and {out_dir / 'gate.pt'}" if published else ""))
    if diverged is not None:
        raise diverged


def fit_gates(seed_args: list, names: list[str], data: dict, num_classes: int, device,
              log_paths: list[Path]) -> list[tuple[dict, str] | DivergedError]:
    """Train every gate in ``names`` once per seed (each of ``seed_args``' ``seed``), all of them
    together as one ensemble (engine.gate.train_gates: each gate exactly as it trains alone). Per
    seed ``(results, the name best on validation)``, or the DivergedError of its first diverged
    gate; each seed's gates log to its ``log_paths`` entry, in the order of ``names``."""
    members, logs = [], []
    for args, log_path in zip(seed_args, log_paths):
        seed_everything(args.seed)
        epoch_log = EpochLog(log_path, group=lambda row: names.index(row["gate"]))  # one JSON line per gate and epoch
        fit, select = gate_training_data(data, args.gate_train_split, args.seed)
        print(f"training {', '.join(f'{name} ({GATE_LABELS[name]})' for name in names)} on {len(fit.labels)} cached "
              f"{args.gate_train_split} examples, picking the epoch on {len(select.labels)} other validation examples "
              f"({args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g}, wd {args.weight_decay:g}, "
              f"seed {args.seed}, {'a new order each epoch' if args.reshuffle else 'one order for every epoch'})")
        members += [(name, args.seed, fit, select) for name in names]
        logs += [epoch_log] * len(names)
    if len(members) > 1:
        print(f"the {len(members)} gates train together as one ensemble")
    first = seed_args[0]
    fitted = train_gates(members, num_classes, first.epochs, first.lr, first.weight_decay, first.batch_size, device,
                         logs, first.reshuffle)
    outcomes = []
    for start in range(0, len(fitted), len(names)):
        results = dict(zip(names, fitted[start:start + len(names)]))
        error = next((result for result in results.values() if isinstance(result, DivergedError)), None)
        outcomes.append(error if error is not None else
                        (results, max(names, key=lambda name: results[name].best_val_acc)))  # the first of equals wins
    return outcomes


def teacher_test_predictions(args, splits, head_record: DistillRecord):
    """The teacher's test predictions from stage 2's logit cache, or None (with a warning) when the
    cache holds none for this teacher and these images: the statistics then leave the teacher out."""
    # A further teacher's logits are cached in its own folder (train_distillation.py --teacher_model A B ...).
    cache = teacher_cache(stage_dir(args, "distill") / "cache", head_record.teacher)
    logits = read_cached_teacher_logits(splits, head_record.teacher_id, cache)
    if logits is None:
        log.warning("no cached teacher logits for this head's teacher: complementarity with the teacher left out")
        return None
    return logits.argmax(-1)


def is_default_head(args, head_record: DistillRecord) -> bool:
    """Whether the fused head is stage 2's default (the top-level distill/ folder's)."""
    folder = stage_dir(args, "distill")
    return (folder / META_FILE).is_file() and DistillRecord.load(folder, args.dataname).head_id == head_record.head_id


def parse(argv=None):
    """The command line as ``main`` takes it: ``--config`` defaults, then every flag rule and the
    rules across flags checked."""
    args = parse_args(get_args_parser(), argv, FLAG_RULES)
    check_args(args)
    return args


if __name__ == "__main__":
    sys.exit(run_cli(main, parse=parse))
