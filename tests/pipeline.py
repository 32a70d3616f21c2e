"""The whole toy pipeline trained once per test session, for tests that need real stage outputs.

    from tests.pipeline import trained_pipeline  # noqa: F401  (a session fixture -> Pipeline)

    def test_something(trained_pipeline):
        gate_dir = trained_pipeline.stage("gate")

Stage 0 is replaced by synthetic annotations (no API); stages 1, 2 and 3 run in-process through
their ``main(argv)`` with the toy configs and short schedules, stage 3 with ``--gate all`` (so
``gate.pt`` holds the variant best on validation and ``gate_<name>.pt`` every variant). The
result is memoised here, so modules that import the fixture share one run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PIPELINE_HEAD_EPOCHS = 2  # stage 2's head epochs in the session pipeline (reasons below)
PIPELINE_GATE_EPOCHS = 30  # stage 3's epochs in the session pipeline
# Stage 3's flags in the session pipeline (with the toy config); a rerun must pass the same ones.
PIPELINE_GATE_ARGS = ("--gate", "all", "--epochs", str(PIPELINE_GATE_EPOCHS), "--batch_size", "32")


@dataclass(frozen=True)
class Pipeline:
    data_root: Path
    output_dir: Path
    vlm_model: Path
    dataname: str = "toy"

    def stage(self, name: str) -> Path:
        """``<output_dir>/<dataname>/<name>``, e.g. ``stage("gate")``."""
        return self.output_dir / self.dataname / name

    def argv(self, *extra: str) -> list[str]:
        """The shared flags every stage script takes, plus ``extra``."""
        return ["--dataname", self.dataname, "--data_root", str(self.data_root),
                "--output_dir", str(self.output_dir), *extra]


def write_annotations(pipeline: Pipeline) -> Path:
    """Stand-in for stage 0: one templated annotation per training image."""
    from data.annotations import ANNOTATIONS_FILE, Annotation, append_annotation
    from data.datasets import load_dataset
    from utils.checkpoints import write_meta

    splits = load_dataset(pipeline.data_root, pipeline.dataname, pipeline.output_dir)
    folder = pipeline.stage("instructions")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ANNOTATIONS_FILE, "w", encoding="utf-8") as fh:
        for sample in splits.train:
            label = splits.class_names[sample.label]
            append_annotation(fh, Annotation(sample.path, label, f"A {label} scene: one shape on a plain ground.",
                                             "Its colours and shape set the mood.", "tests"))
    write_meta(folder, "instructions", splits.class_names, generator="tests")
    return folder / ANNOTATIONS_FILE


def run_pipeline(pipeline: Pipeline, vlm_epochs: int = 1, teacher_epochs: int = 2, head_epochs: int = 10,
                 gate_args: tuple[str, ...] | None = ("--gate", "all")) -> Pipeline:
    """Stages 0 (synthetic), 1, 2 and 3 into ``pipeline.output_dir``; ``gate_args`` None stops after 2."""
    from engine.stages import distill as train_distillation
    from engine.stages import gate as train_gate
    from engine.stages import vlm as train_vlm

    write_annotations(pipeline)
    train_vlm.main(pipeline.argv("--vlm_model", str(pipeline.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                                 "--epoch", str(vlm_epochs), "--skip_eval"))
    train_distillation.main(pipeline.argv("--config", str(CONFIGS / "toy_distill.yaml"),
                                          "--teacher_epochs", str(teacher_epochs), "--epochs", str(head_epochs)))
    if gate_args is not None:
        train_gate.main(pipeline.argv("--config", str(CONFIGS / "toy_gate.yaml"), *gate_args))
    return pipeline


_BUILT: dict[tuple, Pipeline] = {}


@pytest.fixture(scope="session")
def trained_pipeline(tmp_path_factory, toy_root, tiny_vlm_dir) -> Pipeline:
    """Stages 1-3 trained on the session's toy data (4 classes) with the tiny VLM (settings below)."""
    key = (str(toy_root), str(tiny_vlm_dir))
    if key not in _BUILT:
        output_dir = tmp_path_factory.mktemp("pipeline_outputs")
        # A VLM and a head that are both well above chance yet each wrong on some images, so the
        # gate has something to fuse: stage 1 for configs/toy_vlm.yaml's 5 epochs (after 1 the VLM
        # still gives every image one class: 25%, chance), the head for 2 epochs (after 10 it is
        # right on every training image and the gate learns to ignore the VLM), 30 gate epochs in
        # batches of 32 (pinned: the measured figures in test_stage3.py must not move with a default).
        # Measured test accuracy: VLM 84.4%, head 87.5%, concat_linear gate 90.6%.
        _BUILT[key] = run_pipeline(Pipeline(toy_root, output_dir, tiny_vlm_dir), vlm_epochs=5, head_epochs=PIPELINE_HEAD_EPOCHS,
                                   gate_args=PIPELINE_GATE_ARGS)
    return _BUILT[key]
