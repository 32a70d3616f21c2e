"""Mutation check: switch off one defining part of the method at a time and make sure a test fails.

    make mutations                          # = python scripts/mutations.py: every mutant
    python scripts/mutations.py --list      # the mutants, what each breaks, the tests that should notice
    python scripts/mutations.py --only kl_direction --only t_squared

Each mutant is one exact text replacement (file, old text, new text). The tracked and new
(non-ignored) files of the repository are copied to a temporary folder (``.venv`` is linked, not
copied); each mutant is applied there in turn and only its relevant tests run (``pytest -x``), then
the file is restored. A mutant is *killed* when a test fails. First, before any mutant, the same
tests run on the unchanged copy and must pass, so a failure really is the mutant's doing.

Exit status: 0 when every mutant is killed; 1 when one survives (or the unchanged tests fail);
2 when a mutant's old text is not found exactly once in its file (the source changed: re-anchor
the mutant to the new text). Takes about 6 minutes on 2 CPU cores (25 on a busy machine); not part of ``make test``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 1200  # seconds per pytest run; a mutant that hangs the tests counts as killed


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    breaks: str


METHOD = "tests/test_method.py::"
SETTINGS = "tests/test_settings_reach.py::"
KEY = SETTINGS + "test_config_key_reaches_what_is_trained"
TASKS = "tests/test_vlm_tasks.py::"
MUTANTS = (
    Mutant("collator_whole_sequence", "train_vlm.py",
           "data_collator=ConversationCollator(processor, args.train_on_prompt)",
           "data_collator=ConversationCollator(processor, True)",
           (METHOD + "test_trainer_batches_label_only_the_answers",),
           "stage 1's Trainer collator puts labels on the whole sequence"),
    Mutant("answer_mask_in_encoding", "models/chat.py",
           "    if train_on_prompt:",
           "    if True:",
           ("tests/test_stage1.py::test_masking_labels_only_answers",
            METHOD + "test_trainer_batches_label_only_the_answers"),
           "encode_conversations labels every text token"),
    Mutant("stage1_tunes_on_val_images", "engine/vlm_train.py",
           "        if annotation.image not in train_paths:",
           "        if False:",
           ("tests/test_stage1.py::test_examples_skip_val_images_and_refuse_missing_ones",),
           "stage 1 instruction-tunes on annotations of validation images"),
    Mutant("stage1_tunes_on_authors_val_test_records", "data/annotations.py",
           '        if split != "train":',
           "        if False:",
           ("tests/test_reference_annotations.py::"
            "test_records_are_matched_by_class_and_file_name_and_each_kind_reported",),
           "the authors' instruction records of validation and test images are trained on"),
    Mutant("stage0_annotates_val_images", "engine/instructions.py",
           "todo = [sample for sample in splits.train if sample.path not in skip]",
           "todo = [sample for sample in splits.train + splits.val if sample.path not in skip]",
           ("tests/test_stage0.py::test_normal_run_covers_training_images_only",),
           "stage 0 annotates the validation split too (it leaks into instruction tuning)"),
    Mutant("emoset_default_writes_val", "data/prepare.py",
           "        if not args.official_val:\n            images, val_left_out = leave_out_val(images)",
           "        if False:\n            images, val_left_out = leave_out_val(images)",
           ("tests/test_prepare.py::test_emoset_default_leaves_val_out_for_the_loader_to_carve_from_train",),
           "data.prepare emoset writes val/ from val.json by default, not the reference's carve-out from train/"),
    Mutant("kl_direction", "models/heads.py",
           "    log_student = F.log_softmax(student_logits / temperature, dim=-1)\n"
           "    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)\n",
           "    log_student = F.log_softmax(teacher_logits / temperature, dim=-1)\n"
           "    log_teacher = F.log_softmax(student_logits / temperature, dim=-1)\n",
           ("tests/test_stage2.py::test_loss_matches_the_formula",),
           "KL of the student from the teacher swapped: KL(student, teacher) instead of KL(teacher, student)"),
    Mutant("t_squared", "models/heads.py",
           "return alpha * temperature ** 2 * kd + (1 - alpha) * ce",
           "return alpha * kd + (1 - alpha) * ce",
           ("tests/test_stage2.py::test_loss_matches_the_formula",),
           "the T^2 factor on the soft-target term is dropped"),
    Mutant("ce_weight", "models/heads.py",
           "return alpha * temperature ** 2 * kd + (1 - alpha) * ce",
           "return alpha * temperature ** 2 * kd + alpha * ce",
           ("tests/test_stage2.py::test_loss_matches_the_formula",),
           "CE weighted alpha instead of (1 - alpha) (the same at the default 0.5)"),
    Mutant("teacher_logits_train_augmentation", "engine/features.py",
           '            _, self.transform = teacher_transforms(checkpoint["data_config"])',
           '            self.transform, _ = teacher_transforms(checkpoint["data_config"])',
           (METHOD + "test_teacher_cache_equals_a_direct_pass_with_the_evaluation_transform",),
           "the teacher's logits are cached through the training augmentation"),
    Mutant("teacher_epoch_on_train", "engine/distill.py",
           "evaluate = partial(evaluate_teacher, model, val_loader, device,",
           "evaluate = partial(evaluate_teacher, model, train_loader, device,",
           (METHOD + "test_teacher_keeps_the_epoch_best_on_validation_not_on_training",),
           "the teacher's epoch is picked on the training split"),
    # The data-parallel teacher: each process's loss over the global batch, so the summed gradients
    # are one process's; a local mean weighs the ranks' images unequally when a batch splits unevenly.
    Mutant("teacher_local_mean", "engine/distill.py",
           "(loss / (sizes[step] if sizes is not None else len(labels))).backward()",
           "(loss / len(labels)).backward()",
           ("tests/test_scale_out.py::test_stage2_teacher_data_parallel_over_two_processes_equals_one",),
           "the data-parallel teacher divides each process's loss by its own images, not the global batch"),
    Mutant("gate_epoch_on_train", "engine/gate.py",
           "    selects = [member[3] for member in members]  # the data each gate's epoch is picked on",
           "    selects = [member[2] for member in members]  # the data each gate's epoch is picked on",
           (METHOD + "test_gate_keeps_the_epoch_best_on_validation_not_on_training",),
           "the gate's epoch is picked on the training split"),
    Mutant("head_epoch_on_train", "engine/distill.py",
           'x_val, t_val, y_val = (values["val"] for values',
           'x_val, t_val, y_val = (values["train"] for values',
           (METHOD + "test_head_keeps_the_epoch_best_on_validation_not_on_training",),
           "the head's epoch is picked on the training split"),
    # engine.fit keeps the best state for the teacher, the head and the gate: this one mutant replaces
    # head_last_epoch and gate_last_epoch, and the head's and the gate's tests notice it too (the
    # teacher's does not: its 3-epoch toy run ends on an epoch as good as its best).
    Mutant("fit_last_epoch", "engine/fit.py",
           "        model.load_state_dict(self.best_state)\n",
           "",
           ("tests/test_fit.py::test_fit_keeps_the_state_best_on_validation_and_one_row_per_epoch",
            METHOD + "test_head_keeps_the_epoch_best_on_validation_not_on_training",
            METHOD + "test_gate_keeps_the_epoch_best_on_validation_not_on_training"),
           "the teacher, the head and the gate keep their last epoch, not the best on validation"),
    Mutant("fit_best_is_last", "engine/fit.py",
           "if self.best_score is None or self.score(row) > self.best_score:",
           "if True:",
           ("tests/test_fit.py::test_fit_keeps_the_state_best_on_validation_and_one_row_per_epoch",),
           "engine.fit reports and keeps the last epoch as the best"),
    Mutant("onehot_off_by_one", "models/gates.py",
           "        signal[known, predictions.pred[known]] = 1.0",
           "        signal[known, (predictions.pred[known] + 1) % num_classes] = 1.0",
           ("tests/test_stage3.py::test_vlm_gate_inputs_onehot_zero_when_unparseable_and_probs",),
           "the VLM's one-hot marks the next class"),
    Mutant("stage3_zero_vlm_signal", "train_gate.py",
           "vlm_signal=vlm_gate_inputs(answers[split], num_classes, args.vlm_signal),",
           "vlm_signal=torch.zeros(len(answers[split].pred), num_classes),",
           (METHOD + "test_gate_uses_both_inputs_and_is_as_good_as_the_better_one",),
           "stage 3 feeds the gate a zero VLM signal: the fused model never sees the VLM"),
    Mutant("class_order_between_stages", "train_gate.py",
           "head_logits=head_logits(head, features[split]),",
           "head_logits=head_logits(head, features[split]).flip(1),",
           ("tests/test_stage3.py::test_pipeline_outputs_table_and_accuracy",
            METHOD + "test_gate_uses_both_inputs_and_is_as_good_as_the_better_one",
            "tests/test_demo.py::test_predictions_match_stage3_evaluation"),
           "stage 3 reads the head's logits in reversed class order"),
    Mutant("demo_zero_vlm_signal", "engine/predictor.py",
           "        signal = vlm_gate_inputs(answered, num_classes, self.vlm_signal)",
           "        signal = torch.zeros(len(images), num_classes)",
           ("tests/test_demo.py::test_predictions_match_stage3_evaluation",),
           "the demo's gate never sees the VLM's answer"),
    Mutant("head_features_with_adapter", "models/vlm.py",
           '    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext(), vision_dtype(model, dtype):',
           "    with nullcontext(), vision_dtype(model, dtype):",
           ("tests/test_demo.py::test_head_features_ignore_an_adapter_on_the_vision_tower",),
           "the demo's head features come from the adapted encoder, not the base one"),
    Mutant("ablation_selected_gate", "utils/ablation.py",
           'return [metrics["gates"][PAPER_GATE]["accuracy"] for metrics in runs if PAPER_GATE in metrics.get("gates", {})]',
           'return [metrics["gates"][metrics["gate"]]["accuracy"] for metrics in runs]',
           ("tests/test_report.py::test_depth_ablation_compares_the_papers_gate_on_every_row",
            "tests/test_report.py::test_alpha_ablation_compares_the_papers_gate_on_every_row"),
           "the depth/alpha ablation's EmoVLM-KD column takes the gate each run selected (rows compare different gates)"),
    Mutant("heads_from_the_first_teacher", "train_distillation.py",
           '        inputs = {"features": features, "teacher_logits": teacher_logits, "labels": labels,',
           '        inputs = {"features": features, "teacher_logits": all_logits[0], "labels": labels,',
           ("tests/test_teachers.py::test_a_further_teachers_head_is_distilled_from_its_own_logits",),
           "with --teacher_model A B every head is distilled from the first teacher's logits (the teacher "
           "ablation's heads all the same teacher's)"),
    Mutant("efficiency_selected_gate", "engine/efficiency.py",
           "    fused = PAPER_GATE if PAPER_GATE in gate_rows else published",
           "    fused = published",
           ("tests/test_report.py::test_efficiency_figures_equal_a_hand_count_on_the_tiny_models",),
           "the efficiency row adds the gate selected on validation, not the paper's concat_linear"),
    Mutant("runs_paired_over_other_images", "utils/runs.py",
           "            check_same_images(dataset, (base, found[base][dataset]), (other, found[other][dataset]))\n",
           "",
           ("tests/test_report.py::test_runs_over_other_test_images_are_refused_in_one_line",),
           "report --runs pairs two runs' predictions over different test image lists"),
    # The settings of the method: each reaches what is trained (tests/test_settings_reach.py).
    Mutant("head_without_dropout", "models/heads.py",
           "HEAD_DROPOUT = 0.1",
           "HEAD_DROPOUT = 0.0",
           (SETTINGS + "test_head_has_gelu_and_dropout_0_1_active_in_training_only",),
           "the distilled head is built without its dropout (0.0 instead of 0.1)"),
    Mutant("head_relu", "models/heads.py",
           "layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]",
           "layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]",
           (SETTINGS + "test_head_has_gelu_and_dropout_0_1_active_in_training_only",),
           "the distilled head's hidden layers use ReLU instead of GELU"),
    Mutant("gate_init_unseeded", "engine/gate.py",
           "        torch.manual_seed(seed)\n        gates.append(build_gate(name, num_classes))",
           "        gates.append(build_gate(name, num_classes))",
           (SETTINGS + "test_gate_starts_from_pytorch_default_init_drawn_from_its_seed",),
           "a gate's initialisation depends on the gates trained before it, not on its seed alone"),
    Mutant("lora_dropout_ignored", "engine/vlm_train.py",
           "lora_dropout=dropout,",
           "lora_dropout=0.05,",
           (KEY + "[vlm-lora_dropout]",),
           "stage 1's --lora_dropout (and its config key) ignored: LoRA dropout fixed at the paper's 0.05"),
    Mutant("head_weight_decay_ignored", "engine/distill.py",
           "    optimizer = MemberAdam(ensemble.parameters(), lr, weight_decay)\n    x_all, t_all, y_all",
           "    optimizer = MemberAdam(ensemble.parameters(), lr, 1e-4)\n    x_all, t_all, y_all",
           (KEY + "[distill-weight_decay]",),
           "stage 2's --weight_decay ignored: the head's Adam fixed at the paper's 1e-4"),
    Mutant("kept_logits_unshifted", "engine/vlm_train.py",
           "    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX",
           "    keep[:, 1:] = labels[:, 1:] != IGNORE_INDEX",
           ("tests/test_stage1.py::test_logits_at_the_labelled_positions_give_the_trainers_loss_and_gradients",),
           "stage 1 keeps the logits at the labelled tokens themselves, not at the positions predicting them "
           "(one position late)"),
    Mutant("kept_logits_count_ignored", "engine/vlm_train.py",
           "        normalised = self.model_accepts_loss_kwargs and num_items_in_batch is not None",
           "        normalised = False",
           ("tests/test_stage1.py::test_logits_at_the_labelled_positions_give_the_trainers_loss_and_gradients",),
           "stage 1's loss at the labelled positions ignores the Trainer's count of labelled tokens "
           "(wrong under gradient accumulation)"),
    Mutant("val_scored_in_train_mode", "engine/vlm_train.py",
           "        model.eval()\n        try:\n            with torch.no_grad(), scoring_attention(model):",
           "        try:\n            with torch.no_grad(), scoring_attention(model):",
           ("tests/test_stage1.py::test_eval_every_epoch_logs_val_acc_and_changes_no_weight",),
           "the validation after each epoch scores with dropout on: it draws from the training's random "
           "numbers and changes the weights"),
    Mutant("stage1_ignores_tasks", "engine/vlm_train.py",
           "                        for task, conversation in conversations.items() if task in tasks)",
           "                        for task, conversation in conversations.items())",
           (TASKS + "test_build_examples_keeps_only_the_tasks_asked_for",
            TASKS + "test_tasks_reach_the_trainer_and_the_default_is_all_three"),
           "stage 1's --tasks ignored: every annotated image trains all three conversations"),
    Mutant("vlm_row_hides_tasks", "utils/report.py",
           "                label = vlm_label(tasks)",
           "                label = vlm_label(None)",
           (TASKS + "test_report_names_the_tasks_of_the_vlm_row",),
           "the report's VLM row does not say it was tuned on fewer tasks"),
    Mutant("zero_shot_loads_the_adapter", "train_vlm.py",
           "    model = load_vlm(vlm_model, device, dtype=vlm_torch_dtype(LATER_STAGES_DTYPE), quant=quant)  # no adapter",
           "    model = load_vlm(vlm_model, device, dtype=vlm_torch_dtype(LATER_STAGES_DTYPE), quant=quant,\n"
           "                     adapter=stage_dir(args, 'vlm') if stage_dir(args, 'vlm').is_dir() else None)",
           (TASKS + "test_zero_shot_scores_the_base_without_adapter_into_its_own_folder",),
           "the zero-shot evaluation scores the tuned VLM (its stage-1 adapter loaded) instead of the base"),
    Mutant("zero_shot_writes_into_vlm", "train_vlm.py",
           "    return zero_shot_folder(args.output_dir, args.dataname, args.vlm_model or DEFAULT_VLM)",
           "    return stage_dir(args, 'vlm')",
           (TASKS + "test_zero_shot_scores_the_base_without_adapter_into_its_own_folder",),
           "the zero-shot evaluation writes into the tuned VLM's folder (overwriting its evaluation)"),
)


class AnchorError(Exception):
    """A mutant's old text is not found exactly once: the source changed under it."""


def check_anchors(root: Path, mutants) -> None:
    problems = []
    for mutant in mutants:
        path = root / mutant.file
        count = path.read_text(encoding="utf-8").count(mutant.old) if path.is_file() else 0
        if count != 1:
            where = "missing file" if not path.is_file() else f"found {count} times"
            problems.append(f"  {mutant.name}: old text in {mutant.file} {where}, need exactly once:\n"
                            f"    {mutant.old!r}")
    if problems:
        raise AnchorError("\n".join(problems))


def copy_repo(dest: Path) -> None:
    """Tracked and new non-ignored files (the working tree as it is), with .venv linked."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    if (REPO / ".venv").exists():
        (dest / ".venv").symlink_to((REPO / ".venv").resolve())


def run_tests(root: Path, tests) -> tuple[str, str]:
    """``(status, detail)``: status passed, failed or timeout; detail names the failing test."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {TIMEOUT} s"
    if done.returncode == 0:
        return "passed", ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, flags=re.M)
    if done.returncode == 1 and failed:
        return "failed", failed[0]
    return "failed", f"pytest exit {done.returncode}: " + (done.stdout + done.stderr).strip()[-300:].replace("\n", " ")


def print_table(rows) -> None:
    print("\n| mutant | breaks | killed by | status |\n|---|---|---|---|")
    for mutant, status, detail in rows:
        print(f"| {mutant.name} | {mutant.breaks} | {detail or '-'} | {status} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutant (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    names = [m.name for m in MUTANTS]
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        print(f"error: --only {', '.join(unknown)}: no such mutant; see --list", file=sys.stderr)
        return 2
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.breaks}\n    {m.file}; tests: {' '.join(m.tests)}")
        return 0
    try:
        check_anchors(REPO, MUTANTS)
    except AnchorError as err:
        print(f"error: mutants no longer match the source (re-anchor them in {Path(__file__).name}):\n{err}",
              file=sys.stderr)
        return 2

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        tests = list(dict.fromkeys(test for m in mutants for test in m.tests))
        print(f"unchanged copy: {len(tests)} test(s) must pass first ...", flush=True)
        status, detail = run_tests(root, tests)
        if status != "passed":
            print(f"error: the tests fail without any mutant ({detail}); fix them first", file=sys.stderr)
            return 1
        rows = []
        for mutant in mutants:
            path = root / mutant.file
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(mutant.old, mutant.new, 1), encoding="utf-8")
            try:
                status, detail = run_tests(root, mutant.tests)
            finally:
                path.write_text(original, encoding="utf-8")
            verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}[status]
            rows.append((mutant, verdict, detail))
            print(f"{mutant.name}: {verdict} {detail}", flush=True)
    print_table(rows)
    survivors = [m.name for m, verdict, _ in rows if verdict == "SURVIVED"]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutants killed in {time.perf_counter() - start:.0f} s")
    if survivors:
        print(f"error: surviving mutants: {', '.join(survivors)}: no test notices these parts switched off",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
