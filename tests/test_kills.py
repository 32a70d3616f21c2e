"""Kill a stage with SIGKILL part-way, rerun it: the rerun resumes or starts clean, never trusts a
half-written file, keeps the earlier results until then, and ends with the outputs of an
uninterrupted run (same seed). ``tests/kill_at.py`` kills at a chosen call of a function."""
from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch

import train_distillation
import train_gate
from tests.conftest import run_script
from tests.pipeline import (CONFIGS, PIPELINE_GATE_ARGS, PIPELINE_HEAD_EPOCHS, ToyRun,  # noqa: F401
                            finished, trained_pipeline, write_annotations)

# The session pipeline's own settings, so an uninterrupted run is the pipeline's output.
STAGE2 = ("--config", str(CONFIGS / "toy_distill.yaml"), "--teacher_epochs", "2", "--epochs", str(PIPELINE_HEAD_EPOCHS),
          "--num_workers", "0")
STAGE3 = ("--config", str(CONFIGS / "toy_gate.yaml"), *PIPELINE_GATE_ARGS, "--num_workers", "0")


def kill_during(target: str, call: int, script: str, *argv: str) -> None:
    result = run_script("tests/kill_at.py", target, str(call), script, *argv, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def files(folder, *names) -> dict:
    return {name: (folder / name).read_bytes() for name in names}


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def same_weights(a, b) -> bool:
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same_head(distill, reference) -> None:
    """Stage 2's head and its test metrics equal the uninterrupted run's; no staged folder left."""
    assert same_weights(distill / "head.pt", reference / "head.pt")
    metrics = [json.loads((p / "metrics.json").read_text()) for p in (distill, reference)]
    assert metrics[0]["accuracy"] == metrics[1]["accuracy"] and metrics[0]["agreement"] == metrics[1]["agreement"]
    assert not (distill.parent / ".distill.new").exists()


def same_gates(gate, reference) -> None:
    """Stage 3's table and every gate's weights equal the uninterrupted run's."""
    assert (gate / "table.md").read_text() == (reference / "table.md").read_text()
    for name in ["gate.pt", *(p.name for p in reference.glob("gate_*.pt"))]:
        assert same_weights(gate / name, reference / name), name


# Per stage: its script, its main, the flags of the uninterrupted run, the files a killed run must
# leave as they were, and the check that the rerun equals the uninterrupted run.
STAGES = {"distill": ("train_distillation.py", train_distillation, STAGE2, ("meta.json", "head.pt", "metrics.json"),
                      same_head),
          "gate": ("train_gate.py", train_gate, STAGE3, ("meta.json", "gate.pt", "table.md"), same_gates)}


@pytest.mark.parametrize("stage, target, call", [
    ("distill", "utils.cache:store", 2),                   # frozen pass: 1 split cached
    ("distill", "engine.distill:distillation_loss", 10),   # head training, epoch 2 (7 calls an epoch)
    ("gate", "utils.cache:store", 2),                      # VLM answers: 1 split cached
    ("gate", "engine.gate:_evaluate_each", 3)])            # gate training, epoch 3
def test_killed_then_rerun_ends_as_an_uninterrupted_run(stage, target, call, finished, trained_pipeline):
    script, module, argv, kept_files, same_as_uninterrupted = STAGES[stage]
    folder = finished.stage(stage)
    if target.endswith(":store"):  # killed while caching: start with no cache, so there is one to write
        shutil.rmtree(folder / "cache")
    kept = files(folder, *kept_files)
    kill_during(target, call, script, *finished.argv(*argv))
    assert files(folder, *kept_files) == kept  # the old results are still the trusted ones

    module.main(module.parse(finished.argv(*argv)))
    same_as_uninterrupted(folder, trained_pipeline.stage(stage))


@pytest.mark.slow
def test_stage1_killed_between_checkpoints_resumes_to_the_uninterrupted_adapter(trained_pipeline, tmp_path):
    """Two 2-epoch runs of the tiny VLM (~40 s): one uninterrupted, one killed in epoch 2 and resumed."""
    from safetensors.torch import load_file

    runs = {}
    for name in ("whole", "killed"):
        pipeline = ToyRun(trained_pipeline.data_root, tmp_path / name, trained_pipeline.vlm_model)
        write_annotations(pipeline)
        argv = pipeline.argv("--vlm_model", str(pipeline.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                             "--epoch", "2", "--skip_eval", "--num_workers", "0")
        if name == "killed":  # 66 batches per epoch: call 70 is in epoch 2, after checkpoint 1
            kill_during("engine.vlm_train:ConversationCollator.__call__", 70, "train_vlm.py", *argv)
            assert not (pipeline.stage("vlm") / "meta.json").exists()  # nothing finished, nothing trusted
            argv += ["--resume"]
        result = run_script("train_vlm.py", *argv, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[name] = pipeline.stage("vlm")
    assert "resuming from" in result.stdout
    whole, resumed = (load_file(runs[name] / "adapter_model.safetensors") for name in ("whole", "killed"))
    assert whole.keys() == resumed.keys() and all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)
    history = [json.loads(line) for line in (runs["killed"] / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2]
