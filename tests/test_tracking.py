"""--report_to: every training stage's runs in TensorBoard (W&B and MLflow offline where installed),
the log.txt rows as their metrics; off by default, refused at once when the package is missing."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train_distillation
import train_gate
import train_vlm
from bench.world import CONFIGS, ToyRun, write_annotations
from conftest import REPO, run_script
from utils.errors import UserError, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = {"train_vlm": train_vlm, "train_distillation": train_distillation, "train_gate": train_gate}
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed "
                                       "(pip install -r requirements-tracking.txt)")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def event_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the event files directly in ``run_dir``, read back by
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def one_run(folder: Path) -> Path:
    """The one start-time folder an invocation left under ``folder`` (``<stage>/tensorboard``)."""
    [started] = [path for path in folder.iterdir() if path.is_dir()]
    return started


def assert_rows_logged(run_dir: Path, rows: list[dict], keys=("train_loss", "val_loss", "val_acc")) -> None:
    scalars = event_scalars(run_dir)
    assert rows, run_dir
    for key in keys:
        assert [step for step, _ in scalars[key]] == [row["epoch"] for row in rows], (run_dir, key)
        assert [value for _, value in scalars[key]] == pytest.approx([row[key] for row in rows], rel=1e-6)


@pytest.fixture(scope="module")
def tracked_world(tmp_path_factory, toy_root, tiny_vlm_dir) -> ToyRun:
    """Stages 1-3 on the toy world, each with --report_to tensorboard: stage 2 a sweep of two
    heads, stage 3 every gate for two seeds (short schedules)."""
    if not HAS_TENSORBOARD:
        pytest.skip("tensorboard is not installed (pip install -r requirements-tracking.txt)")
    run = ToyRun(toy_root, tmp_path_factory.mktemp("tracked") / "outputs", tiny_vlm_dir)
    write_annotations(run)
    track = ("--report_to", "tensorboard")
    train_vlm.main(train_vlm.parse(run.argv("--vlm_model", str(run.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                                            "--epochs", "2", "--skip_eval", *track)))
    train_distillation.main(train_distillation.parse(run.argv(
        "--config", str(CONFIGS / "toy_distill.yaml"), "--teacher_epochs", "2", "--epochs", "3",
        "--depth", "0", "1", *track)))
    train_gate.main(train_gate.parse(run.argv("--config", str(CONFIGS / "toy_gate.yaml"), "--epochs", "3",
                                              "--gate", "all", "--seeds", "1", "2", *track)))
    return run


@needs_tensorboard
def test_stage2_event_files_hold_the_rows_of_log_txt(tracked_world):
    """The teacher's run and each head of the sweep, its own run in one invocation's folder: the
    same train_loss, val_loss and val_acc per epoch as its log.txt."""
    teacher = one_run(tracked_world.stage("teacher") / "tensorboard")
    assert_rows_logged(teacher / "teacher", read_log(tracked_world.stage("teacher") / "log.txt"))
    started = one_run(tracked_world.stage("distill") / "tensorboard")
    assert started.name == teacher.name  # one invocation: one group
    heads = sorted(path.name for path in started.iterdir())
    assert heads == ["depth=0,alpha=0.5,seed=42", "depth=1,alpha=0.5,seed=42"]
    for head in heads:
        rows = read_log(tracked_world.stage("distill") / "runs" / head / "log.txt")
        assert len(rows) == 3
        assert_rows_logged(started / head, rows)


@needs_tensorboard
def test_stage3_each_gate_and_seed_is_a_run_of_its_own(tracked_world):
    from models.gates import GATES

    started = one_run(tracked_world.stage("gate") / "tensorboard")
    [head_run] = [path.name for path in started.iterdir()]
    for seed in (1, 2):
        rows = read_log(tracked_world.stage("gate") / "runs" / head_run / f"seed={seed}" / "log.txt")
        assert sorted(path.name for path in (started / head_run / f"seed={seed}").iterdir()) == sorted(GATES)
        for gate in GATES:
            assert_rows_logged(started / head_run / f"seed={seed}" / gate, [row for row in rows if row["gate"] == gate])


@needs_tensorboard
def test_stage1_logs_every_step_and_the_epoch_rows(tracked_world):
    """The Trainer's TensorBoard integration: the loss and learning rate of every optimiser step,
    and the rows of log.txt (``epoch_loss``: their train_loss, the mean of the epoch's steps)."""
    vlm = tracked_world.stage("vlm")
    rows = read_log(vlm / "log.txt")
    assert [row["epoch"] for row in rows] == [1, 2]
    scalars = event_scalars(one_run(vlm / "tensorboard") / "vlm")
    steps = rows[-1]["step"]
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, steps + 1))
    assert [step for step, _ in scalars["train/learning_rate"]] == list(range(1, steps + 1))
    per_epoch = steps // 2
    losses = [value for _, value in scalars["train/loss"]]
    for row, first in zip(rows, (0, per_epoch)):
        assert row["train_loss"] == pytest.approx(sum(losses[first:first + per_epoch]) / per_epoch, rel=1e-5)
    for tag, key in (("train/epoch_loss", "train_loss"), ("train/val_acc", "val_acc")):
        assert [step for step, _ in scalars[tag]] == [row["step"] for row in rows]
        assert [value for _, value in scalars[tag]] == pytest.approx([row[key] for row in rows], rel=1e-6)


@needs_tensorboard
def test_under_torchrun_rank_0_alone_writes_the_runs(tracked_world, tmp_path):
    """Stage 3 on two gloo processes: the VLM answers sharded, the gates trained and logged by rank 0
    (accelerate's process state is made for it alone: no hang on the group the others left)."""
    output_dir = tmp_path / "outputs"
    for stage in ("vlm", "distill"):
        shutil.copytree(tracked_world.stage(stage), output_dir / "toy" / stage,
                        ignore=shutil.ignore_patterns("tensorboard", ".lock*"))
    shutil.copy(tracked_world.output_dir / "toy" / "split.json", output_dir / "toy" / "split.json")
    argv = [*tracked_world.argv("--config", str(CONFIGS / "toy_gate.yaml"), "--epochs", "2", "--gate", "concat_linear",
                                "--report_to", "tensorboard")]
    argv[argv.index("--output_dir") + 1] = str(output_dir)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train_gate.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sharded over 2 processes" in result.stderr
    gate = output_dir / "toy" / "gate"
    [run] = (one_run(gate / "tensorboard")).glob("*/seed=42/concat_linear")
    assert_rows_logged(run, read_log(next((gate / "runs").glob("*/seed=42/log.txt"))))


@pytest.mark.parametrize("script", sorted(STAGES))
def test_a_missing_tracker_package_is_one_line_before_any_work(script, monkeypatch, tmp_path, capsys):
    """Every training stage names the package to install and exits with 2 before reading anything
    (the output folder stays empty)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    stage = STAGES[script]
    argv = ["--dataname", "toy", "--output_dir", str(tmp_path / "outputs"), "--report_to", "wandb", "tensorboard"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"--report_to wandb: the wandb package is not installed; pip install wandb$"):
        stage.parse(argv)
    assert run_cli(stage.main, argv, parse=stage.parse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --report_to wandb: the wandb package is not installed; pip install wandb"]
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(UserError, match="pip install tensorboard"):
        stage.parse(argv[:-2] + ["tensorboard"])
    with pytest.raises(UserError, match="none turns tracking off"):
        stage.parse(argv[:-2] + ["none", "tensorboard"])


def test_report_to_from_a_settings_file_is_checked_as_on_the_command_line(tmp_path, monkeypatch):
    config = tmp_path / "gate.yaml"
    config.write_text("report_to: tensorboard\n", encoding="utf-8")
    argv = ["--dataname", "toy", "--config", str(config)]
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        train_gate.parse(argv)
    monkeypatch.delitem(sys.modules, "tensorboard")
    if HAS_TENSORBOARD:
        assert train_gate.parse(argv).report_to == ["tensorboard"]
        assert train_gate.parse([*argv, "--report_to", "none"]).report_to == ["none"]  # the command line wins


def test_report_to_is_off_by_default_and_imports_no_tracker(tmp_path):
    """Without --report_to: every stage parses it as none, the Trainer is told none and logs per
    epoch as before, a stage's log.txt rows go nowhere else, and no tracker package is imported
    (a fresh process: the suite may have imported them)."""
    code = f"""
import sys
from pathlib import Path
import train_distillation, train_gate, train_vlm
from engine.fit import EpochLog
from engine.vlm_train import trainer_settings
from utils.tracking import tracked
root = Path({str(tmp_path)!r})
argv = ["--dataname", "toy", "--output_dir", str(root / "outputs")]
for stage in (train_vlm, train_distillation, train_gate):
    assert stage.parse(argv).report_to == ["none"]
settings = trainer_settings(train_vlm.parse(argv), root / "trainer", on_gpu=False)
assert settings["report_to"] == "none" and settings["logging_strategy"] == "epoch", settings

@tracked("gate")
def main(args):
    EpochLog(root / "outputs" / "toy" / "gate" / "log.txt").add({{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5}})

main(train_gate.parse(argv))
print(sorted(name for name in ("tensorboard", "tensorboardX", "wandb", "mlflow") if name in sys.modules))
print(sorted(str(path.relative_to(root)) for path in root.rglob("*")))
"""
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr
    imported, files = result.stdout.strip().splitlines()[-2:]
    assert imported == "[]"
    assert files == "['outputs', 'outputs/toy', 'outputs/toy/gate', 'outputs/toy/gate/log.txt']"


@needs_tensorboard
def test_under_a_launcher_only_rank_0_logs(tmp_path, monkeypatch):
    from engine.fit import EpochLog
    from utils.tracking import tracked

    root = tmp_path / "outputs" / "toy"
    args = train_gate.parse(["--dataname", "toy", "--output_dir", str(tmp_path / "outputs"), "--report_to", "tensorboard"])

    @tracked("gate")
    def main(args):
        EpochLog(root / "gate" / "log.txt").add({"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_acc": 0.5})

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    main(args)
    assert not (root / "gate" / "tensorboard").exists()
    monkeypatch.setenv("RANK", "0")
    main(args)
    [run] = (root / "gate" / "tensorboard").glob("*/gate")
    assert event_scalars(run)["val_acc"] == [(1, 0.5)]


def test_stage1_environment_points_the_trainer_into_the_stage_folder(tmp_path, monkeypatch):
    """The Trainer's integrations read their folders from the environment: set under the stage
    folder while it trains, a variable the user set kept, all restored afterwards."""
    from utils.tracking import trainer_environment, trainer_reporting

    for key in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "WANDB_DIR", "WANDB_RUN_GROUP", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    args = train_vlm.get_args_parser().parse_args(["--dataname", "toy", "--report_to", "tensorboard", "wandb", "mlflow"])
    assert trainer_reporting(args) == {"report_to": ["tensorboard", "wandb", "mlflow"], "run_name": "toy/vlm",
                                       "logging_strategy": "steps", "logging_steps": 1}
    folder = tmp_path / "outputs" / "toy" / "vlm"
    with trainer_environment(args, folder):
        logging_dir = Path(os.environ["TENSORBOARD_LOGGING_DIR"])
        assert logging_dir.parent.parent == folder / "tensorboard" and logging_dir.name == "vlm"
        assert os.environ["WANDB_PROJECT"] == "mine" and os.environ["WANDB_DIR"] == str(folder)
        assert os.environ["WANDB_RUN_GROUP"].startswith("toy/vlm/")
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{(folder / 'mlflow.db').resolve()}"
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    assert os.environ["WANDB_PROJECT"] == "mine"


def test_runs_are_named_after_dataset_stage_and_run(tmp_path):
    """A row's run: the stage folder, the run folders below it (staging names undone, runs/ dropped)
    and its text tag; every run of the invocation in one group."""
    from utils.tracking import Tracking

    root = tmp_path / "outputs" / "toy"
    session = Tracking(["tensorboard"], root, "distill", {})
    assert session.where(root / ".teacher.new" / "log.txt", {"epoch": 1}) == (root / "teacher", [])
    assert session.where(root / "distill" / "runs" / ".depth=1,alpha=0.5,seed=42.new" / "log.txt", {"epoch": 1}) \
        == (root / "distill", ["depth=1,alpha=0.5,seed=42"])
    assert session.where(root / "gate" / "runs" / "depth=1,alpha=0.5,seed=42" / ".seed=3.new" / "log.txt",
                         {"gate": "concat_linear", "epoch": 1}) \
        == (root / "gate", ["depth=1,alpha=0.5,seed=42", "seed=3", "concat_linear"])
    assert session.group.startswith("toy/distill/")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_runs_of_one_group(tmp_path, monkeypatch):
    """Two heads trained together: two offline W&B runs under the stage folder, each named after
    its head, both in the invocation's group, each holding the rows (read as bytes: the W&B SDK
    has no public reader of offline runs)."""
    from engine.fit import EpochLog
    from utils.tracking import tracked

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "outputs" / "toy"
    args = train_gate.get_args_parser().parse_args(["--dataname", "toy", "--output_dir", str(tmp_path / "outputs"),
                                                    "--report_to", "wandb"])
    heads = ("depth=0,alpha=0.5,seed=1", "depth=1,alpha=0.5,seed=1")

    @tracked("distill")
    def main(args):
        logs = [EpochLog(root / "distill" / "runs" / head / "log.txt") for head in heads]
        for epoch in (1, 2):
            for log in logs:
                log.add({"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 2.0 / epoch, "val_acc": 0.25 * epoch})

    main(args)
    runs = [next(run.glob("*.wandb")).read_bytes() for run in sorted((root / "distill" / "wandb").glob("offline-run-*"))]
    assert len(runs) == 2
    assert sorted(head for head in heads for data in runs if f"toy/distill/{head}".encode() in data) == sorted(heads)
    groups = {group for data in runs for group in re.findall(rb"toy/distill/\d{8}-\d{6}", data)}
    assert len(groups) == 1
    assert all(b"val_acc" in data and b"report_to" in data for data in runs)


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (pip install mlflow)")
def test_mlflow_store_in_the_stage_folder_runs_of_one_group(tmp_path, monkeypatch):
    import mlflow

    from engine.fit import EpochLog
    from utils.tracking import tracked

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "outputs" / "toy"
    args = train_gate.get_args_parser().parse_args(["--dataname", "toy", "--output_dir", str(tmp_path / "outputs"),
                                                    "--report_to", "mlflow"])
    rows = [{"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 2.0 / epoch, "val_acc": 0.25 * epoch}
            for epoch in (1, 2)]

    @tracked("distill")
    def main(args):
        logs = [EpochLog(root / "distill" / "runs" / run / "log.txt")
                for run in ("depth=0,alpha=0.5,seed=1", "depth=1,alpha=0.5,seed=1")]
        for row in rows:  # the members' rows arrive epoch by epoch
            for log in logs:
                log.add(row)

    main(args)
    client = mlflow.MlflowClient(f"sqlite:///{(root / 'distill' / 'mlflow.db').resolve()}")
    [experiment] = [e for e in client.search_experiments() if e.name == "emovlm-kd"]
    found = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in found) == ["toy/distill/depth=0,alpha=0.5,seed=1",
                                                          "toy/distill/depth=1,alpha=0.5,seed=1"]
    assert len({run.data.tags["group"] for run in found}) == 1
    for run in found:
        history = client.get_metric_history(run.info.run_id, "val_acc")
        assert [(m.step, m.value) for m in history] == [(row["epoch"], row["val_acc"]) for row in rows]
