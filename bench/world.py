"""The toy world a stage benchmark or a test runs in: toy images, the tiny VLM, and the stages run
in-process through their ``main(argv)`` with the toy configs. Stage 0 is replaced by one templated
annotation per training image, so no API or generation is needed. ``tests/pipeline.py`` builds the
test session's pipeline with these functions (with its own schedules)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data.annotations import ANNOTATIONS_FILE, Annotation, append_annotation
from data.datasets import load_dataset
from data.toy import make_toy_dataset
import train_distillation
import train_gate
import train_vlm
from models.tiny import build_tiny_vlm
from utils.checkpoints import write_meta

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEMPLATE_GENERATOR = "toy-template"  # the annotations' generator: the template below, not a model


@dataclass(frozen=True)
class ToyRun:
    data_root: Path
    output_dir: Path
    vlm_model: Path
    dataname: str = "toy"

    def stage(self, name: str) -> Path:
        """``<output_dir>/<dataname>/<name>``, e.g. ``stage("gate")``."""
        return self.output_dir / self.dataname / name

    def argv(self, *extra: str) -> list[str]:
        """The flags every stage script shares, plus ``extra``."""
        return ["--dataname", self.dataname, "--data_root", str(self.data_root),
                "--output_dir", str(self.output_dir), *extra]


def write_annotations(run: ToyRun) -> Path:
    """Stand-in for stage 0: one templated annotation per training image."""
    splits = load_dataset(run.data_root, run.dataname, run.output_dir)
    folder = run.stage("instructions")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ANNOTATIONS_FILE, "w", encoding="utf-8") as fh:
        for sample in splits.train:
            label = splits.class_names[sample.label]
            append_annotation(fh, Annotation(sample.path, label, f"A {label} scene: one shape on a plain ground.",
                                             "Its colours and shape set the mood.", TEMPLATE_GENERATOR))
    write_meta(folder, "instructions", splits.class_names, generator=TEMPLATE_GENERATOR)
    return folder / ANNOTATIONS_FILE


def run_stages(run: ToyRun, vlm_epochs: int, teacher_epochs: int, head_epochs: int,
               gate_args: tuple[str, ...] | None = None, vlm_eval: bool = False) -> ToyRun:
    """Stages 0 (synthetic), 1 and 2 into ``run.output_dir``, then stage 3 with ``gate_args`` unless None;
    ``vlm_eval``: stage 1 evaluates on the test split (``vlm/eval_score/``)."""
    write_annotations(run)
    train_vlm.main(train_vlm.parse(run.argv("--vlm_model", str(run.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                            "--epoch", str(vlm_epochs), *(() if vlm_eval else ("--skip_eval",)))))
    train_distillation.main(train_distillation.parse(run.argv("--config", str(CONFIGS / "toy_distill.yaml"),
                                     "--teacher_epochs", str(teacher_epochs), "--epochs", str(head_epochs))))
    if gate_args is not None:
        train_gate.main(train_gate.parse(run.argv("--config", str(CONFIGS / "toy_gate.yaml"), *gate_args)))
    return run


def stages_1_and_2(root: Path, classes: int, per_class: int, test_per_class: int, vlm_epochs: int = 1,
                   teacher_epochs: int = 1, head_epochs: int = 1) -> ToyRun:
    """Toy images and the tiny VLM under ``root``, then stages 0 (synthetic), 1 and 2 with the toy configs."""
    make_toy_dataset(root / "images" / "toy", num_classes=classes, per_class=per_class,
                     test_per_class=test_per_class, seed=0, size=64)
    run = ToyRun(root / "images", root / "outputs", build_tiny_vlm(root / "tiny", seed=0))
    return run_stages(run, vlm_epochs, teacher_epochs, head_epochs)
