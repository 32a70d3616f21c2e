"""Stage 3: train the gate that fuses the VLM's answer with the distilled head's logits.

Reads stage 1 (``<output_dir>/<dataname>/vlm/``) and stage 2 (``.../distill/``, ``.../teacher/``),
computes both frozen inputs once per image (cached), trains the gate on those tensors, keeps
the best epoch on validation and writes ``gate.pt``, ``metrics.json``, ``table.md`` and the
pictures to ``<output_dir>/<dataname>/gate/``.

    python train_gate.py --dataname emoset --gpu 0                 # the paper's gate: concat + linear
    python train_gate.py --dataname emoset --gate all              # the ablation: every variant, one table
    python train_gate.py --dataname emoset --gate_train_split val  # fit on validation: the VLM saw the train images
    python train_gate.py --dataname toy --vlm_model checkpoints/tiny-qwen2-vl --config configs/toy_gate.yaml
    torchrun --nproc_per_node 8 train_gate.py --dataname emoset    # VLM answers sharded; the gate trains on rank 0

With ``--gate all`` every variant is saved as ``gate_<name>.pt`` and the one best on validation
(ties: the earlier in the table, concat_linear first) also as ``gate.pt``, which the demo loads.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from utils.cli import base_parser, parse_args, require_positive, stage_dir
from utils.errors import UserError, run_cli
from utils.outputs import StagedOutput, lock_folder, releases_locks

log = logging.getLogger("train_gate")


# What each numeric flag must be (utils.cli.check_flags; the shared flags are checked too).
FLAG_RULES = {"vlm_batch_size": "count", "max_new_tokens": "count", "epochs": "count", "lr": "positive",
              "weight_decay": "nonnegative"}


def get_args_parser():
    from data.prompts import PARSERS
    from engine.gate import ANSWER_MODES, SIGNALS
    from models.gates import GATES

    parser = base_parser("Stage 3: train the gate fusing the VLM's answer and the distilled head.",
                         batch_size=1)
    inputs = parser.add_argument_group("gate inputs")
    inputs.add_argument("--vlm_model", default=None,
                        help="base VLM (default: the one stage 1 was trained on; must match it)")
    inputs.add_argument("--vlm_signal", choices=SIGNALS, default="onehot",
                        help="onehot: the VLM's answer (zeros if unparseable), the paper's; "
                             "probs: its class distribution (needs --vlm_answer score)")
    inputs.add_argument("--vlm_answer", choices=ANSWER_MODES, default="score",
                        help="score: most likely class answer; generate: greedy decoding, parsed")
    inputs.add_argument("--parser", choices=PARSERS, default="lenient",
                        help="--vlm_answer generate: how the decoded answer is read; strict: only the form "
                             "{'emotion': '<class>'} (the reference code's reading), lenient: also a lone class word")
    inputs.add_argument("--vlm_batch_size", type=int, default=8, help="images per VLM forward")
    inputs.add_argument("--max_new_tokens", type=int, default=32, help="--vlm_answer generate")
    inputs.add_argument("--quant", choices=("4bit", "none"), default=None,
                        help="how the VLM answering is loaded: 4bit (CUDA) or none (full precision); "
                             "default: as stage 1 trained it")
    gate = parser.add_argument_group("gate (--batch_size: images per optimiser step; 1, as the reference code)")
    gate.add_argument("--gate", choices=[*GATES, "all"], default="concat_linear",
                      help="gate variant; all: train every variant and tabulate them")
    gate.add_argument("--gate_train_split", choices=("train", "val"), default="train",
                      help="train: fit on the training split, pick the epoch on validation (the paper); "
                           "val: fit on a stratified half of validation, pick the epoch on the other half "
                           "(the VLM was instruction-tuned on the training images, so its answers there "
                           "are better than on unseen ones)")
    gate.add_argument("--epochs", "--epoch", dest="epochs", type=int, default=10)
    gate.add_argument("--lr", type=float, default=1e-4)
    gate.add_argument("--weight_decay", type=float, default=1e-4)
    return parser


def read_inputs(args):
    """Stage 1 and 2 metadata (read before anything else: a missing stage fails at once)."""
    from utils.checkpoints import read_meta

    vlm_dir, distill_dir = stage_dir(args, "vlm"), stage_dir(args, "distill")
    vlm_meta = read_meta(vlm_dir, "vlm", args.dataname)
    return vlm_dir, vlm_meta, distill_dir, read_meta(distill_dir, "distill", args.dataname)


def check_inputs(args, class_names, vlm_dir, vlm_meta, distill_dir, head_meta) -> None:
    """Both stages trained for these classes, the head on the VLM stage 1 tuned."""
    from utils.checkpoints import check_compatible

    check_compatible(vlm_meta, vlm_dir, class_names=class_names, base_model=args.vlm_model)
    check_compatible(head_meta, distill_dir, class_names=class_names)
    if head_meta["base_model"] != vlm_meta["base_model"]:
        raise UserError(f"{distill_dir}: head trained on features of VLM {head_meta['base_model']!r}, but the "
                        f"stage-1 adapter in {vlm_dir} is on {vlm_meta['base_model']!r}; rerun "
                        f"`python train_distillation.py --dataname {args.dataname} "
                        f"--vlm_model {vlm_meta['base_model']}`")


def vlm_quant(args, vlm_meta: dict, device) -> str:
    """How the VLM answering is loaded, ``4bit`` or ``none``: --quant, by default as stage 1 trained
    it (in full precision where 4-bit cannot run)."""
    from engine.vlm_eval import trained_quant

    return trained_quant(vlm_meta, args.quant, device) or "none"


def gate_inputs(args, splits, vlm_dir, vlm_meta, distill_dir, head_meta, device) -> dict:
    """``{split: GateData}``: the cached VLM answers and the frozen head on stage 2's cached features
    (exactly those the head was trained on: a mismatch asks to rerun stage 2, never re-encodes)."""
    import torch

    from engine.distill import cached_vlm_features, head_logits, load_head
    from engine.gate import GateData, cached_vlm_predictions, vlm_gate_inputs
    from engine.vlm_eval import load_trained_vlm

    head, _ = load_head(distill_dir, splits.class_names)
    pixels = {"min_pixels": head_meta.get("min_pixels"), "max_pixels": head_meta.get("max_pixels")}
    features = cached_vlm_features(splits, head_meta["base_model"], pixels, device, args.vlm_batch_size,
                                   distill_dir / "cache", dtype=head_meta.get("feature_dtype"), build=False)

    quant = vlm_quant(args, vlm_meta, device)

    def load_model():
        model, processor, _ = load_trained_vlm(vlm_dir, device, quant=quant)
        return model, processor

    answers = cached_vlm_predictions(splits, vlm_meta, stage_dir(args, "gate") / "cache", load_model,
                                     args.vlm_answer, args.vlm_batch_size, args.max_new_tokens, quant,
                                     parser=args.parser)
    num_classes = len(splits.class_names)
    return {split: GateData(vlm_pred=answers[split].pred,
                            vlm_signal=vlm_gate_inputs(answers[split], num_classes, args.vlm_signal),
                            head_logits=head_logits(head, features[split]),
                            labels=torch.tensor([s.label for s in splits.split(split)], dtype=torch.long))
            for split in ("train", "val", "test")}


def teacher_metrics(args, class_names, num_test: int) -> dict | None:
    """The test metrics of the teacher the head was distilled from (stage 2's metrics.json)."""
    from utils.io import read_json

    path = stage_dir(args, "distill") / "metrics.json"
    metrics = read_json(path).get("teacher") if path.is_file() else None
    if not metrics:
        return None
    if metrics.get("class_names") != list(class_names) or metrics.get("n") != num_test:
        log.warning("teacher metrics in %s are for other classes or another test split; row left out", path)
        return None
    return metrics


def curve_rows(results: dict) -> list[dict]:
    """Per-epoch rows for curves.png; with several gates each key is prefixed by the gate's name."""
    prefix = len(results) > 1
    return [{"epoch": row["epoch"], **{(f"{name} {key}" if prefix else key): value for key, value in row.items()
                                       if key not in ("gate", "epoch")}}
            for name, result in results.items() for row in result.history]


def write_results(args, out_dir: Path, data: dict, results: dict, selected: str, class_names, provenance) -> str:
    """gate.pt (and gate_<name>.pt), metrics.json, pictures, table.md, run.json; meta.json last."""
    from engine.gate import predictions, save_gate, split_accuracies
    from models.gates import GATE_LABELS
    from utils.checkpoints import file_id, write_meta
    from utils.io import write_json, write_text
    from utils.metrics import classification_metrics, save_confusion_png, save_curves_png
    from utils.report import dataset_rows, markdown_table
    from utils.run import record_run

    if len(results) > 1:
        for name, result in results.items():
            save_gate(out_dir / f"gate_{name}.pt", result, class_names, **provenance)
    save_gate(out_dir / "gate.pt", results[selected], class_names, **provenance)

    test = data["test"]
    labels = test.labels.tolist()
    metrics = {
        "dataset": args.dataname, "split": "test", "n": len(labels), "class_names": class_names,
        "vlm": classification_metrics(labels, test.vlm_pred.tolist(), class_names),
        "head": classification_metrics(labels, test.head_logits.argmax(1).tolist(), class_names),
        "teacher": teacher_metrics(args, class_names, len(labels)),
        "gates": {name: {**classification_metrics(labels, predictions(result.gate, test).tolist(), class_names),
                         "best_epoch": result.best_epoch, "val_accuracy": result.best_val_acc}
                  for name, result in results.items()},
        "gate": selected, "gate_train_split": args.gate_train_split, "splits": split_accuracies(data),
        # Test answers no class could be read from (with --vlm_answer generate; `parser` says how).
        "vlm_unparseable": int((test.vlm_pred < 0).sum()),
        **provenance,
    }
    write_json(out_dir / "metrics.json", metrics)
    save_confusion_png(metrics["gates"][selected]["confusion_matrix"], class_names,
                       out_dir / "confusion_matrix.png", f"{args.dataname}: EmoVLM-KD ({selected})")
    save_curves_png(curve_rows(results), out_dir / "curves.png", f"{args.dataname}: gate training")
    table = markdown_table(dataset_rows(args.dataname, metrics)) + "\n\nGates: " + "; ".join(
        f"`{name}` = {GATE_LABELS[name]}" for name in results) + ".\n"
    write_text(out_dir / "table.md", table)
    record_run(out_dir, args, selected_gate=selected)
    write_meta(out_dir, "gate", class_names, gate=selected, gate_id=file_id(out_dir / "gate.pt"), **provenance)
    return table


@releases_locks
def main(argv=None) -> None:
    args = parse_args(get_args_parser(), argv, FLAG_RULES)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from data.datasets import load_dataset
    from engine.gate import gate_training_data, split_accuracies, train_gate
    from models.gates import GATE_LABELS, GATES
    from utils.dist import init_distributed, leave_process_group, training_device
    from utils.run import seed_everything

    if args.vlm_signal == "probs" and args.vlm_answer != "score":
        raise UserError("--vlm_signal probs needs class probabilities: use --vlm_answer score")
    require_positive(args, "epochs", "batch_size", "vlm_batch_size", "max_new_tokens")
    seed_everything(args.seed)
    vlm_dir, vlm_meta, distill_dir, head_meta = read_inputs(args)
    splits = load_dataset(args.data_root, args.dataname, args.output_dir, args.skip_bad_images)
    print(splits.summary())
    check_inputs(args, splits.class_names, vlm_dir, vlm_meta, distill_dir, head_meta)
    out_dir = stage_dir(args, "gate")
    lock_folder(out_dir)  # one run per folder, until main returns (rank 0 only)
    staged = StagedOutput(out_dir)  # the old gate stays until the new one is complete
    rank, _ = init_distributed()  # under torchrun the VLM-answer pass is sharded across the ranks
    device = training_device(args.gpu)
    args.quant = vlm_quant(args, vlm_meta, device)  # resolved once: recorded in run.json and gate.pt
    data = gate_inputs(args, splits, vlm_dir, vlm_meta, distill_dir, head_meta, device)
    leave_process_group()  # the frozen passes are over: the gate trains on rank 0 alone
    if rank != 0:
        return

    new_dir = staged.begin()
    log_path = new_dir / "log.txt"

    def log_epoch(row: dict) -> None:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"[{row['gate']}] epoch {row['epoch']}: train loss {row['train_loss']:.4f}, "
              f"val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.4f}")

    for split, row in split_accuracies(data).items():
        print(f"{split}: VLM accuracy {row['vlm_accuracy']:.4f}, head accuracy {row['head_accuracy']:.4f} "
              f"({row['n']} images)")
    names = list(GATES) if args.gate == "all" else [args.gate]
    fit, select = gate_training_data(data, args.gate_train_split, args.seed)
    print(f"training {', '.join(f'{name} ({GATE_LABELS[name]})' for name in names)} on {len(fit.labels)} cached "
          f"{args.gate_train_split} examples, picking the epoch on {len(select.labels)} other validation examples "
          f"({args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr:g}, wd {args.weight_decay:g})")
    results = {name: train_gate(name, len(splits.class_names), fit, select, args.epochs,
                                args.lr, args.weight_decay, args.batch_size, args.seed, device, log_epoch)
               for name in names}
    selected = max(names, key=lambda name: results[name].best_val_acc)  # the first of equals wins
    provenance = {"vlm_signal": args.vlm_signal, "vlm_answer": args.vlm_answer, "parser": args.parser,
                  "max_new_tokens": args.max_new_tokens, "quant": args.quant,
                  "vlm_adapter_id": vlm_meta["adapter_id"], "head_id": head_meta["head_id"],
                  "base_model": vlm_meta["base_model"]}
    table = write_results(args, new_dir, data, results, selected, splits.class_names, provenance)
    staged.commit([(f"the {name} gate's validation loss", results[name].history[-1]["val_loss"]) for name in names])
    print(table)
    print(f"saved gate {selected!r} (val acc {results[selected].best_val_acc:.4f} at epoch "
          f"{results[selected].best_epoch}) to {out_dir / 'gate.pt'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
