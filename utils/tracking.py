"""Following a run in TensorBoard, Weights & Biases or MLflow (``--report_to``, stages 1-3).

Nothing here writes a logger of its own: stage 1 hands the trackers to the transformers Trainer's
integrations (:func:`trainer_reporting`, :func:`trainer_environment`), stages 2 and 3 to
accelerate's tracker classes (``accelerate.tracking``), one tracker object per run.

Stages 2 and 3 mirror their ``log.txt`` files: while a stage's :func:`tracked` ``main`` runs with
``--report_to`` set, every history row an ``engine.fit.EpochLog`` writes is also logged
(:func:`track_row`), one run per ``log.txt`` (and per value of a row's text tag: stage 3's
gates share a seed's log), its rows as the run's metrics at step ``epoch`` and the stage's
arguments as its config. A run is named after the dataset, the stage folder and the run's folder
below it (``toy/distill/depth=1,alpha=0.5,seed=42``, ``toy/gate/<head run>/seed=42/concat_linear``);
the runs of one invocation share a group (``toy/distill/<start time>``): a sweep's heads, or the
teacher and the heads stage 2 trained, side by side. Offline files go under the stage folder:
``<stage>/tensorboard/<start time>/<run>/``, ``<stage>/wandb/``, ``<stage>/mlflow.db`` (unless
``MLFLOW_TRACKING_URI`` names another store). Under a launcher only rank 0 logs.

The flag itself (``add_report_to_flag``) and its check before any work (a tracker whose package
is missing: one line naming the ``pip install``) are ``utils.cli``'s. With ``--report_to none``
(the default) no tracker package is imported and nothing is written.
"""
from __future__ import annotations

import functools
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from accelerate.state import PartialState
from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

from utils.cli import NONE, trackers
from utils.dist import distributed_rank
from utils.outputs import unstaged_name
from utils.sweeps import RUNS

PROJECT = "emovlm-kd"  # the W&B project and MLflow experiment unless WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME say
TENSORBOARD_DIR, WANDB_DIR = "tensorboard", "wandb"  # under the stage folder
# MLflow's store under the stage folder: an SQLite file (MLflow's own local default; its plain-file
# store is refused by MLflow 3 unless opted into), the runs' artifacts beside it.
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"


def mlflow_store(folder: Path) -> str:
    """The MLflow tracking URI of a stage folder's own store (``MLFLOW_TRACKING_URI`` wins)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(folder) / MLFLOW_DB).resolve()}"


def run_config(args) -> dict:
    """The stage's arguments as a tracker config: scalars as they are, lists as text, no secrets."""
    def value(item):
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        return json.dumps(item) if isinstance(item, (list, tuple, dict)) else str(item)
    return {key: value(item) for key, item in sorted(vars(args).items()) if "key" not in key.lower()}


def _started() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# ---------------------------------------------------------------- stage 1: the Trainer's integrations

def trainer_reporting(args) -> dict:
    """The Trainer's tracking settings from ``--report_to`` (``report_to`` and ``run_name``; with a
    tracker, a log per optimiser step, so the trackers get the step's loss and learning rate; the
    epoch's row of log.txt is then the mean of its steps, engine.vlm_train.epoch_logger)."""
    names = trackers(getattr(args, "report_to", None))
    if not names:
        return {"report_to": NONE}
    return {"report_to": names, "run_name": f"{args.dataname}/vlm", "logging_strategy": "steps", "logging_steps": 1}


@contextmanager
def trainer_environment(args, folder: str | Path) -> Iterator[None]:
    """While the Trainer is built and trains: the environment its integrations read, so their files
    go under the stage ``folder`` and the W&B run joins a group named as stages 2-3 name theirs. A
    variable the user set wins; the old environment comes back afterwards."""
    names = trackers(getattr(args, "report_to", None))
    folder = Path(folder)
    started = _started()
    settings = {}
    if "tensorboard" in names:
        settings["TENSORBOARD_LOGGING_DIR"] = str(folder / TENSORBOARD_DIR / started / folder.name)
    if "wandb" in names:
        settings.update(WANDB_PROJECT=PROJECT, WANDB_DIR=str(folder),
                        WANDB_RUN_GROUP=f"{args.dataname}/{folder.name}/{started}")
        (folder / WANDB_DIR).mkdir(parents=True, exist_ok=True)
    if "mlflow" in names:
        settings.update(MLFLOW_TRACKING_URI=mlflow_store(folder), MLFLOW_EXPERIMENT_NAME=PROJECT)
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update({key: value for key, value in settings.items() if saved[key] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


# ---------------------------------------------------------------- stages 2-3: accelerate's trackers

# What a launcher sets; hidden while accelerate's process state is made for rank 0 alone.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def one_process_state() -> None:
    """accelerate's trackers log through its process-aware logger, which needs accelerate's process
    state. Only rank 0 logs, and stages 2-3 train after leaving the launcher's process group: the
    state is made for this one process (the launcher's variables hidden meanwhile), never by joining
    a group the other ranks have left. A state made before (the Trainer's, stage 1) is kept."""
    if PartialState._shared_state != {}:  # the test accelerate's logger makes
        return
    launcher = {key: os.environ.pop(key) for key in LAUNCHER_VARIABLES if key in os.environ}
    try:
        PartialState()
    finally:
        os.environ.update(launcher)


class _Run:
    """One tracked run: one accelerate tracker per ``--report_to`` name, started on its first row."""

    def __init__(self, names: list[str], name: str, group: str, folder: Path, tb_dir: str, config: dict):
        one_process_state()
        self.trackers = []
        for tracker in names:
            if tracker == "tensorboard":
                made = TensorBoardTracker(tb_dir, folder / TENSORBOARD_DIR)
            elif tracker == "wandb":  # the config given to wandb.init: several runs are open at once, and
                # WandBTracker.store_init_configuration writes to the global wandb.config (no run's own)
                (folder / WANDB_DIR).mkdir(parents=True, exist_ok=True)
                made = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=name, group=group,
                                    dir=str(folder), reinit="create_new", config=config)
            else:
                made = _MLflowRun(MLflowTracker, name, group, folder)
            made.main_process_only = False  # the rank check is ours: only rank 0 opens runs (tracked)
            made.start()
            if tracker != "wandb":
                made.store_init_configuration(config)
            self.trackers.append(made)

    def log(self, values: dict, step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


class _MLflowRun:
    """accelerate's MLflowTracker for a run among several open at once: MLflow logs to its one
    active run, so each row resumes this run (by id) and ends it again."""

    def __init__(self, tracker_class, name: str, group: str, folder: Path):
        import mlflow  # installed only where asked for (--report_to mlflow)
        self.mlflow = mlflow
        mlflow.set_tracking_uri(mlflow_store(folder))
        self.tracker = tracker_class(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=name,
                                     tags={"group": group}, logging_dir=(folder / MLFLOW_ARTIFACTS).resolve().as_uri())
        self.run_id = None

    def start(self) -> None:
        self.tracker.main_process_only = False
        self.tracker.start()
        self.run_id = self.tracker.active_run.info.run_id

    def store_init_configuration(self, config: dict) -> None:
        self.tracker.store_init_configuration(config)
        self.mlflow.end_run()

    def log(self, values: dict, step: int) -> None:
        self.mlflow.start_run(run_id=self.run_id)
        self.tracker.log(values, step=step)
        self.mlflow.end_run()

    def finish(self) -> None:
        pass  # each row ended the run it resumed


class Tracking:
    """The runs of one stage invocation, opened as their ``log.txt`` files get rows."""

    def __init__(self, names: list[str], root: Path, stage: str, config: dict):
        self.names, self.root, self.stage, self.config = names, Path(root), stage, config
        self.started = _started()
        self.group = f"{self.root.name}/{stage}/{self.started}"
        self.runs: dict[str, _Run] = {}

    def where(self, log_path: Path, row: dict) -> tuple[Path, list[str]]:
        """``(stage folder, run parts)`` of a row of ``log_path``: the folders below the dataset's
        (their staging names undone, ``runs`` dropped), then the row's text tags."""
        folder = Path(log_path).resolve().parent
        try:
            parts = [unstaged_name(part) for part in folder.relative_to(self.root.resolve()).parts]
        except ValueError:  # a log outside the dataset's folder: named after its own folder
            parts = [self.stage, unstaged_name(folder.name)]
        parts = parts or [self.stage]
        tags = [str(value) for key, value in row.items() if isinstance(value, str)]
        return self.root / parts[0], [part for part in parts[1:] if part != RUNS] + tags

    def log(self, log_path: Path, row: dict) -> None:
        folder, parts = self.where(log_path, row)
        name = "/".join([self.root.name, folder.name, *parts])
        if name not in self.runs:
            tb_dir = "/".join([self.started, *(parts or [folder.name])])
            self.runs[name] = _Run(self.names, name, self.group, folder, tb_dir, self.config)
        values = {key: value for key, value in row.items()
                  if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.runs[name].log(values, step=row["epoch"])

    def finish(self) -> None:
        while self.runs:
            self.runs.popitem()[1].finish()


_session: Tracking | None = None  # the running stage's, while its tracked main runs


def track_row(log_path: str | Path, row: dict) -> None:
    """Log a history row written to ``log_path`` to the running stage's trackers, if it has any."""
    if _session is not None:
        _session.log(Path(log_path), row)


def tracked(stage: str) -> Callable[[Callable], Callable]:
    """Decorate the ``main(args)`` of stage ``stage`` (2 or 3): with ``--report_to`` set, the
    log.txt rows written while it runs go to the trackers (rank 0 only), and every run is
    finished when it returns or fails."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(args, *rest, **kwargs):
            global _session
            names = trackers(getattr(args, "report_to", None))
            if not names or distributed_rank()[0] != 0:
                return main(args, *rest, **kwargs)
            _session = Tracking(names, Path(args.output_dir) / args.dataname, stage, run_config(args))
            try:
                return main(args, *rest, **kwargs)
            finally:
                session, _session = _session, None
                session.finish()
        return run
    return decorate
