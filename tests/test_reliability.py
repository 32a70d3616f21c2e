"""A failed, diverged or refused run never costs earlier results (staged outputs, finite losses)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline import CONFIGS, ToyRun, finished, trained_pipeline  # noqa: F401

STAGE_FILES = {"vlm": ("meta.json", "adapter_model.safetensors", "log.txt"),
               "teacher": ("meta.json", "teacher.pt"),
               "distill": ("meta.json", "head.pt", "log.txt", "metrics.json"),
               "gate": ("meta.json", "gate.pt", "log.txt", "metrics.json", "table.md")}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread


def snapshot(pipeline: ToyRun) -> dict:
    return {(stage, name): (pipeline.stage(stage) / name).read_bytes()
            for stage, names in STAGE_FILES.items() for name in names}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err  # progress bars share stderr
    lines = re.findall(r"error: [^\r\n]*", err)
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ---------------------------------------------------------------- the staging folder

def test_commit_moves_every_file_in_and_meta_last(tmp_path, monkeypatch):
    import os

    from utils.outputs import StagedOutput

    folder = tmp_path / "gate"
    folder.mkdir()
    (folder / "meta.json").write_text("old")
    (folder / "gate.pt").write_text("old")
    (folder / "cache").mkdir()
    (folder / "cache" / "keep.pt").write_text("cache")
    staged = StagedOutput(folder)
    new = staged.begin()
    assert new.parent == tmp_path and new != folder
    (new / "gate.pt").write_text("new")
    (new / "sub").mkdir()
    (new / "sub" / "x.json").write_text("new")
    (new / "meta.json").write_text("new")
    assert (folder / "meta.json").read_text() == "old"  # nothing replaced before the commit

    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    staged.commit([("loss", 0.5)])
    assert moved[-1] == "meta.json"
    assert {p.name: p.read_text() for p in folder.rglob("*") if p.is_file()} == {
        "meta.json": "new", "gate.pt": "new", "x.json": "new", "keep.pt": "cache"}
    assert not new.exists()


def test_a_killed_commit_is_completed_by_the_next_run(tmp_path):
    from utils.outputs import COMMIT_MARKER, StagedOutput

    folder = tmp_path / "distill"
    staged = StagedOutput(folder)
    new = staged.begin()
    (new / "head.pt").write_text("new")
    (new / "meta.json").write_text("new")
    (new / COMMIT_MARKER).touch()  # killed right after deciding to commit
    StagedOutput(folder).begin()
    assert (folder / "meta.json").read_text() == "new" and (folder / "head.pt").read_text() == "new"


def test_a_non_finite_number_is_never_committed(tmp_path):
    from utils.errors import UserError
    from utils.outputs import StagedOutput

    folder = tmp_path / "gate"
    folder.mkdir()
    (folder / "meta.json").write_text("old")
    staged = StagedOutput(folder)
    (staged.begin() / "meta.json").write_text("new")
    with pytest.raises(UserError, match="--lr"):
        staged.commit([("the loss", float("nan"))], "--lr")
    assert (folder / "meta.json").read_text() == "old"


# ---------------------------------------------------------------- the stages

@pytest.mark.parametrize("stage", ["distill", "gate"])
def test_a_diverged_run_stops_in_one_line_and_keeps_the_old_results(stage, finished, capsys):
    import train_distillation
    import train_gate
    from utils.errors import run_cli

    before = snapshot(finished)
    if stage == "distill":
        argv = finished.argv("--config", str(CONFIGS / "toy_distill.yaml"), "--epochs", "2", "--lr", "1e30")
        code = run_cli(train_distillation.main, argv, parse=train_distillation.parse)
    else:
        code = run_cli(train_gate.main, finished.argv("--config", str(CONFIGS / "toy_gate.yaml"), "--lr", "1e30"), parse=train_gate.parse)
    assert code == 2
    line = one_error_line(capsys)
    assert "diverged" in line and "--lr" in line
    assert snapshot(finished) == before


def test_a_diverged_vlm_run_keeps_the_old_adapter(finished, capsys):
    import train_vlm
    from utils.errors import run_cli

    before = snapshot(finished)
    argv = finished.argv("--vlm_model", str(finished.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                         "--epoch", "1", "--skip_eval", "--lr", "1e30")
    assert run_cli(train_vlm.main, argv, parse=train_vlm.parse) == 2
    line = one_error_line(capsys)
    assert "diverged" in line and "--lr" in line
    assert snapshot(finished) == before


def test_a_damaged_feature_cache_is_named_with_the_command_that_rebuilds_it(finished, capsys):
    import train_gate
    from utils.errors import run_cli

    cache = finished.stage("distill") / "cache" / "vlm_features_test.pt"
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    before = snapshot(finished)
    assert run_cli(train_gate.main, finished.argv("--config", str(CONFIGS / "toy_gate.yaml")), parse=train_gate.parse) == 2
    line = one_error_line(capsys)
    assert "vlm_features_test.pt cannot be read (damaged)" in line and "do not match" not in line
    assert "rerun `python train_distillation.py --dataname toy` to rebuild the feature cache" in line
    assert snapshot(finished) == before  # gate/meta.json and the old gate kept


# ---------------------------------------------------------------- one run per folder

HOLD_LOCK = ("import sys, time; sys.path.insert(0, sys.argv[2]); from utils.outputs import lock_folder; "
             "lock_folder(sys.argv[1]); print('locked', flush=True); time.sleep(120)")


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another run holding ``folder``: a process that took the lock and sleeps."""
    from tests.conftest import REPO

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), str(REPO)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_on_a_busy_folder_stops_at_once_naming_the_first(finished, capsys):
    import train_gate
    from utils.errors import run_cli

    before = snapshot(finished)
    holder = hold_lock(finished.stage("gate"))
    try:
        assert run_cli(train_gate.main, finished.argv("--config", str(CONFIGS / "toy_gate.yaml")), parse=train_gate.parse) == 2
        line = one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by another run (PID {holder.pid}, started " in line and "gate" in line
    assert snapshot(finished) == before


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    from utils.io import read_json
    from utils.outputs import LOCK_INFO, lock_folder, release_locks

    folder = tmp_path / "distill"
    holder = hold_lock(folder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert read_json(folder / LOCK_INFO)["pid"] == holder.pid  # what the killed run left
    try:
        lock_folder(folder)
        assert read_json(folder / LOCK_INFO)["pid"] == os.getpid()
    finally:
        release_locks()
    assert not (folder / LOCK_INFO).exists()


# ---------------------------------------------------------------- folders and files

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_respect_the_umask(umask, mode, tmp_path):
    from utils.io import torch_save, write_json

    old = os.umask(umask)
    try:
        paths = [write_json(tmp_path / "a.json", {}), torch_save({}, tmp_path / "b.pt")]
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in paths] == [mode, mode]


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder this process cannot create anything in (root ignores file modes: /sys then)."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o500)
        return folder / "outputs"
    try:
        (Path("/sys") / "emovlm-kd-probe").mkdir()
    except OSError:
        return Path("/sys") / "outputs"
    pytest.skip("no unwritable folder available")


@pytest.mark.parametrize("stage", ["data.__main__", "generate_instructions", "train_vlm"])
def test_an_unwritable_output_dir_is_one_line(stage, unwritable, toy_root, tiny_vlm_dir, capsys):
    import importlib

    from utils.errors import run_cli

    argv = ["--dataname", "toy", "--data_root", str(toy_root), "--output_dir", str(unwritable)]
    argv += {"generate_instructions": ["--base_url", "http://127.0.0.1:9/v1", "--api_key", "x"],
             "train_vlm": ["--vlm_model", str(tiny_vlm_dir)]}.get(stage, [])
    module = importlib.import_module(stage)
    assert run_cli(module.main, argv, parse=getattr(module, "parse", None)) == 2
    line = one_error_line(capsys)
    assert str(unwritable) in line and "--output_dir" in line


@pytest.mark.parametrize("stage", ["teacher", "gate"])
def test_an_output_folder_that_cannot_be_created_is_one_line(stage, finished, capsys):
    """Stages 2 and 3 (they need earlier outputs; as root, no folder mode stops a write)."""
    import train_distillation
    import train_gate
    from utils.errors import run_cli

    folder = finished.stage(stage)
    shutil.rmtree(folder)
    folder.write_text("a file where a folder belongs")
    script, config = ((train_gate, "toy_gate.yaml") if stage == "gate" else (train_distillation, "toy_distill.yaml"))
    assert run_cli(script.main, finished.argv("--config", str(CONFIGS / config)), parse=script.parse) == 2
    line = one_error_line(capsys)
    assert str(folder) in line and "--output_dir" in line
