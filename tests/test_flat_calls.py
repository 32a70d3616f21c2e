"""Flat calls: from a stage script's ``main`` to the method's code (the distillation loss, a gate's
forward, the class scorer) is a short walk through the repository's own functions.

A walk counts the frames of this repository's code from ``main`` (excluded) down to the method
(included), on the toy pipeline. Library frames (torch's ``Module.__call__``, ``torch.no_grad``
wrappers) and list/dict/set comprehension frames (Python 3.11 gives them a frame; 3.12 inlines
them, PEP 709) are not counted.
"""
from __future__ import annotations

import inspect
import shutil
import sys
from pathlib import Path

import pytest

import train_distillation
import train_gate
import train_vlm
from tests.conftest import REPO
from tests.pipeline import (CONFIGS, PIPELINE_GATE_ARGS, PIPELINE_HEAD_EPOCHS, finished,  # noqa: F401
                            trained_pipeline)

MAX_FRAMES = 6
# The class scorer's entry, models.scorer.predict_vlm (an answer per image: scored, or generated and
# parsed), is reached through stage 3's cache (load_or_build builds a missing split) and the sharded
# pass (shard_map runs this rank's block); score_classes is one frame below it. Stage 3's walk:
# cached_vlm_predictions, load_or_build, answer_split, shard_map, VLMAnswerer.answer_block,
# predict_vlm, score_classes (before #22: 11 frames to score_classes); stage 1's: evaluate,
# evaluate_vlm, predict_samples, shard_map, VLMAnswerer.answer_block, predict_vlm, score_classes
# (before: 9).
COMPREHENSIONS = {"<listcomp>", "<dictcomp>", "<setcomp>"}
ENV = Path(sys.prefix).resolve()  # the virtual environment, which may sit inside the repository (.venv)
STAGE2 = ("--config", str(CONFIGS / "toy_distill.yaml"), "--teacher_epochs", "2", "--epochs", str(PIPELINE_HEAD_EPOCHS),
          "--num_workers", "0")
STAGE3 = ("--config", str(CONFIGS / "toy_gate.yaml"), *PIPELINE_GATE_ARGS, "--num_workers", "0")


class Reached(Exception):
    """Raised at the method to end a run once its walk is recorded."""


class Walks:
    """Records, at each call of a patched function, the walk from ``main`` to it."""

    def __init__(self, script, stop: bool = False):
        self.main = inspect.unwrap(script.main)  # under utils.outputs.releases_locks (and utils.tracking.tracked)
        self.stop = stop
        self.walks: list[list[str]] = []

    def wrap(self, function):
        def recorded(*args, **kwargs):
            self.walks.append([*walk_from(self.main, sys._getframe(1)), function.__qualname__])
            if self.stop:
                raise Reached
            return function(*args, **kwargs)

        return recorded

    def deepest(self) -> list[str]:
        assert self.walks, "the method was never called"
        return max(self.walks, key=len)


def walk_from(main, frame) -> list[str]:
    """This repository's frames from just below ``main`` down to ``frame``, outermost first."""
    walk = []
    while frame.f_code is not main.__code__:
        path = Path(frame.f_code.co_filename).resolve()
        if REPO in path.parents and ENV not in path.parents and frame.f_code.co_name not in COMPREHENSIONS:
            walk.append(f"{path.relative_to(REPO).as_posix()}:{frame.f_code.co_qualname}")
        frame = frame.f_back
        assert frame is not None, "not called from the script's main"
    return walk[::-1]


def test_the_distillation_loss_is_at_most_six_frames_below_stage2s_main(finished, monkeypatch):
    import engine.distill

    walks = Walks(train_distillation)
    monkeypatch.setattr(engine.distill, "distillation_loss", walks.wrap(engine.distill.distillation_loss))
    train_distillation.main(train_distillation.parse(finished.argv(*STAGE2)))  # caches and teacher reused
    assert len(walks.deepest()) <= MAX_FRAMES, walks.deepest()


def test_a_gates_forward_is_at_most_six_frames_below_stage3s_main(finished, monkeypatch):
    from models.gates import ConcatLinearGate

    walks = Walks(train_gate)
    monkeypatch.setattr(ConcatLinearGate, "forward", walks.wrap(ConcatLinearGate.forward))
    train_gate.main(train_gate.parse(finished.argv(*STAGE3)))  # training, validation and the test predictions
    assert len(walks.deepest()) <= MAX_FRAMES, walks.deepest()


@pytest.mark.parametrize("stage", ["vlm", "gate"])
def test_the_class_scorer_is_at_most_six_frames_below_stage1s_and_stage3s_main(stage, finished, monkeypatch):
    import models.scorer

    script, argv = (train_vlm, ("--eval_only",)) if stage == "vlm" else (train_gate, STAGE3)
    if stage == "gate":  # no cached answers: stage 3 runs the VLM
        shutil.rmtree(finished.stage("gate") / "cache")
    walks = Walks(script, stop=True)
    monkeypatch.setattr(models.scorer, "score_classes", walks.wrap(models.scorer.score_classes))
    with pytest.raises(Reached):
        script.main(script.parse(finished.argv(*argv)))
    walk = walks.deepest()
    assert walk[-2].endswith(":predict_vlm") and len(walk) - 1 <= MAX_FRAMES, walk
