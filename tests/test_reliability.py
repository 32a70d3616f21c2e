"""A failed, diverged or refused run never costs earlier results (staged outputs, finite losses)."""
from __future__ import annotations

import errno
import fnmatch
import gc
import os
import re
import shutil
import signal
import subprocess
import sys
import time
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


# ---------------------------------------------------------------- one line where a traceback was (#26)

ENOSPC_LINE = "no space left on device (ENOSPC: No space left on device)"


class FullDiskFile:
    """A file on a full disk: the write that passes ``room`` bytes fails with ENOSPC."""

    def __init__(self, fh, room: int = 512):
        self.fh, self.room, self.written = fh, room, 0

    def write(self, data) -> int:
        self.written += len(data)
        if self.written > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(pattern)``: every torch.save of a file whose name matches ``pattern`` runs out of
    space part-way, as on a full disk: torch's writer raises a RuntimeError ("unexpected pos")
    chained to the write's OSError(ENOSPC)."""
    import torch

    real_save = torch.save

    def fail(pattern: str) -> None:
        def save(obj, f, *args, **kwargs):
            name = Path(str(getattr(f, "name", f)))
            if not fnmatch.fnmatch(name.name, pattern):
                return real_save(obj, f, *args, **kwargs)
            with open(name, "wb") as fh:
                return real_save(obj, FullDiskFile(fh), *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)

    return fail


def staging_folders(pipeline: ToyRun) -> list[Path]:
    return sorted(pipeline.output_dir.rglob(".*.new"))


def test_a_full_disk_while_stage1_saves_a_checkpoint_is_one_line(finished, full_disk, monkeypatch, capsys):
    import train_vlm
    from utils.errors import run_cli

    before = snapshot(finished)
    argv = finished.argv("--vlm_model", str(finished.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                         "--epoch", "1", "--skip_eval")
    full_disk("optimizer.pt")  # the Trainer's checkpoint, after its adapter
    assert run_cli(train_vlm.main, argv, parse=train_vlm.parse) == 2
    line = one_error_line(capsys)
    trainer = finished.stage("vlm") / "trainer"
    assert re.fullmatch(rf"error: {re.escape(str(trainer))}/checkpoint-\d+: {re.escape(ENOSPC_LINE)}; .*", line), line
    assert snapshot(finished) == before  # the earlier adapter and its meta.json untouched
    assert not list(trainer.glob("checkpoint-*"))  # the half-written checkpoint is removed
    assert staging_folders(finished) == [finished.output_dir / "toy" / ".vlm.new"]  # left behind

    monkeypatch.undo()  # space again: the rerun cleans the staging folder and commits
    assert run_cli(train_vlm.main, argv, parse=train_vlm.parse) == 0
    assert staging_folders(finished) == [] and (finished.stage("vlm") / "meta.json").is_file()


@pytest.mark.parametrize("stage", ["distill", "gate"])
def test_a_full_disk_while_stage2_or_3_writes_its_weights_is_one_line_naming_the_file(stage, finished, full_disk,
                                                                                      monkeypatch, capsys):
    import train_distillation
    import train_gate
    from utils.errors import run_cli

    script, argv = ((train_distillation, finished.argv("--config", str(CONFIGS / "toy_distill.yaml"), "--epochs", "2"))
                    if stage == "distill" else
                    (train_gate, finished.argv("--config", str(CONFIGS / "toy_gate.yaml"), "--gate", "concat_linear")))
    weights = {"distill": "head.pt", "gate": "gate.pt"}[stage]
    before = snapshot(finished)
    full_disk(f".{weights}.*")  # the temporary file the weights are written to, then renamed
    assert run_cli(script.main, argv, parse=script.parse) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: ") and f"/{weights}: {ENOSPC_LINE}; " in line, line
    assert "--output_dir" in line and "earlier results are kept" in line
    assert snapshot(finished) == before
    assert staging_folders(finished), "the failed run's staging folder is left behind"
    assert not list(finished.output_dir.rglob(f".{weights}.*"))  # but no temporary file

    monkeypatch.undo()  # space again: the rerun cleans the staging folder and commits
    assert run_cli(script.main, argv, parse=script.parse) == 0
    assert staging_folders(finished) == []


@pytest.fixture
def small_tmpfs(tmp_path) -> Path:
    """A real full disk: a 64 KiB tmpfs (mounting needs root; skipped where it cannot be mounted)."""
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        gc.collect()  # a failed writer's file, held by its traceback's frames
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def test_every_writer_on_a_full_tmpfs_names_the_file(small_tmpfs):
    """torch.save given a path keeps no errno and safetensors only quotes it: both still come out
    as an OSError(ENOSPC) naming what was written, as does the atomic torch_save (no file left)."""
    import torch
    from safetensors.torch import save_file

    from utils.errors import run_cli
    from utils.io import names_failed_writes, torch_save

    tensors = {"w": torch.zeros(100_000)}  # 400 kB: more than the disk holds
    for name, write in [("a.pt", lambda path: torch.save(tensors, path)),
                        ("b.safetensors", lambda path: save_file(tensors, path))]:
        path = small_tmpfs / name
        with pytest.raises(OSError) as err, names_failed_writes(path):
            write(path)
        assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(path))
        path.unlink(missing_ok=True)
    code = run_cli(lambda argv: torch_save(tensors, small_tmpfs / "c.pt"), [])
    assert code == 2 and list(small_tmpfs.iterdir()) == []


def test_a_truncated_adapter_is_one_line_in_predict_and_the_demo(finished, tmp_path, monkeypatch, capsys):
    import demo
    import predict
    from utils.errors import run_cli

    adapter = finished.stage("vlm") / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:50_000])
    images = tmp_path / "photos"
    shutil.copytree(finished.data_root / "toy" / "test" / "awe", images)
    monkeypatch.setattr(demo, "build_app", lambda *a, **k: pytest.fail("the app must not start"))
    for script, argv in [(predict, ["--images", str(images), "--out", str(tmp_path / "p.jsonl")]), (demo, [])]:
        argv = ["--dataname", "toy", "--output_dir", str(finished.output_dir), *argv]
        assert run_cli(script.main, argv, parse=script.parse) == 2
        line = one_error_line(capsys)
        assert str(adapter) in line and "rerun `python train_vlm.py --dataname toy`" in line, line
    assert not (tmp_path / "p.jsonl").exists()


# The meta.json damage of #26: a key deleted, or a value of the wrong type.
DAMAGED_RECORDS = [("vlm", "adapter_id", None), ("vlm", "base_model", None), ("vlm", "class_names", None),
                   ("distill", "head_id", None), ("vlm", "max_pixels", "big"), ("vlm", "class_names", "null"),
                   ("distill", "class_names", "null"), ("distill", "pre_resize", "1024"), ("gate", "gate_id", None),
                   ("gate", "class_names", "null")]


@pytest.mark.parametrize("stage, key, value", DAMAGED_RECORDS)
def test_a_damaged_meta_json_is_one_line_naming_the_file_and_the_key(stage, key, value, finished, tmp_path, capsys):
    """Stage 3 (which reads stage 1's and 2's records) and predict.py (which also reads stage 3's)."""
    import json

    import predict
    import train_gate
    from utils.errors import run_cli

    meta = finished.stage(stage) / "meta.json"
    record = json.loads(meta.read_text())
    if value is None:
        del record[key]
    else:
        record[key] = json.loads(value) if value == "null" else value
    meta.write_text(json.dumps(record))
    before = snapshot(finished)
    images = tmp_path / "photos"
    shutil.copytree(finished.data_root / "toy" / "test" / "awe", images)
    scripts = [(predict, finished.argv("--images", str(images), "--out", str(tmp_path / "p.jsonl")))]
    if stage != "gate":  # stage 3 writes its own meta.json
        scripts.append((train_gate, finished.argv("--config", str(CONFIGS / "toy_gate.yaml"))))
    for script, argv in scripts:
        assert run_cli(script.main, argv, parse=script.parse) == 2
        line = one_error_line(capsys)
        problem = f"no {key} recorded" if value is None else f"{key} is {record[key]!r}, not "
        assert line.startswith(f"error: {meta}: {problem}"), line
        command = {"vlm": "train_vlm.py", "distill": "train_distillation.py", "gate": "train_gate.py"}[stage]
        assert f"rerun `python {command} --dataname toy` to rewrite it" in line, line
    assert snapshot(finished) == before


def test_annotations_that_are_not_utf8_are_one_line_with_file_and_line(finished, capsys):
    import train_vlm
    from utils.errors import run_cli

    annotations = finished.stage("instructions") / "annotations_train.jsonl"
    lines = annotations.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"scene", b"sc\xe8ne")  # Latin-1, not UTF-8
    annotations.write_bytes(b"".join(lines))
    before = snapshot(finished)
    argv = finished.argv("--vlm_model", str(finished.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                         "--skip_eval")
    assert run_cli(train_vlm.main, argv, parse=train_vlm.parse) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {annotations}:3: not UTF-8 text (byte 0xe8 at column "), line
    assert snapshot(finished) == before


PREDICT_SCRIPT = "import sys, predict; from utils.errors import run_cli; sys.exit(run_cli(predict.main, parse=predict.parse))"


def test_two_predict_runs_on_one_output_file_the_second_stops_naming_the_first(finished, tmp_path, capsys):
    import json

    import predict
    from tests.conftest import REPO
    from utils.errors import run_cli

    images, out = tmp_path / "photos", tmp_path / "preds.jsonl"
    shutil.copytree(finished.data_root / "toy" / "test", images)
    argv = ["--dataname", "toy", "--output_dir", str(finished.output_dir), "--images", str(images), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-c", PREDICT_SCRIPT, *argv], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    info = tmp_path / ".preds.jsonl.lock.json"
    try:
        for _ in range(600):  # the first run holds the file once it has checked its flags
            if info.is_file() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert info.is_file(), first.communicate()[1][-2000:]
        assert run_cli(predict.main, argv, parse=predict.parse) == 2
        line = one_error_line(capsys)
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert line.startswith(f"error: --out {out} is in use by another run (PID {first.pid}, started "), line
    names = [json.loads(record)["image"] for record in out.read_text().splitlines()]
    assert len(names) == len(set(names)) == 32  # every image once
    assert not info.exists()


def test_an_output_file_named_like_an_image_in_the_image_folder_is_never_an_input(finished, tmp_path, capsys):
    import json

    import predict
    from utils.errors import run_cli

    images = tmp_path / "photos"
    shutil.copytree(finished.data_root / "toy" / "test" / "awe", images)
    out = images / "preds.png"
    (images / "preds.png.part1").write_text("")  # a part file a killed sharded run left
    argv = ["--dataname", "toy", "--output_dir", str(finished.output_dir), "--images", str(images), "--out", str(out)]
    for run in range(2):  # the rerun finds its own output in the folder
        assert run_cli(predict.main, argv, parse=predict.parse) == 0, capsys.readouterr().err[-2000:]
    assert "0 to predict" in capsys.readouterr().out
    names = [json.loads(record)["image"] for record in out.read_text().splitlines()]
    assert sorted(names) == sorted(path.name for path in images.glob("awe_*.png"))


def test_stage1s_adapter_and_checkpoint_follow_the_umask(finished):
    import train_vlm

    argv = finished.argv("--vlm_model", str(finished.vlm_model), "--config", str(CONFIGS / "toy_vlm.yaml"),
                         "--epoch", "1", "--skip_eval")
    folder = finished.stage("vlm")
    shutil.rmtree(folder / "eval_score", ignore_errors=True)  # the session's evaluation: not rewritten here
    old = os.umask(0o002)
    try:
        train_vlm.main(train_vlm.parse(argv))
    finally:
        os.umask(old)
    modes = {path.relative_to(folder).as_posix(): oct(path.stat().st_mode & 0o777)
             for path in folder.rglob("*") if path.is_file() and not path.name.startswith(".lock")}
    assert "adapter_model.safetensors" in modes and any(name.startswith("trainer/checkpoint-") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != oct(0o664)} == {}
