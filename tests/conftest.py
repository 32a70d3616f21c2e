"""Offline environment and the tiny world (toy images, tiny VLM) shared by the whole suite."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread in the test process and (through the environment) in every script it starts,
# as scripts/quickstart.sh does: the tiny models' ops are too small to split, and on a 2-core
# machine two threads per op spin against each other. Measured on the shared 2-core machine:
# stage 1 of the tiny Qwen2.5-VL, one epoch, 5 s of CPU with one thread; with two, over 12 minutes
# of wall time without finishing the epoch (CI: test_pipeline_end_to_end_above_chance[qwen2_5_vl],
# the only test module of its kind without the one_thread fixture, took 349 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # also where torch was imported before this file
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_script(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python <args>`` from the repository root as a user would; capture its output."""
    return subprocess.run([sys.executable, *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """``<root>/toy/{train,test}`` with 4 classes, 24 train and 8 test images per class."""
    from data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("images")
    make_toy_dataset(root / "toy", num_classes=4, per_class=24, test_per_class=8, seed=0, size=64)
    return root


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL saved as a Hugging Face folder."""
    from models.tiny import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("checkpoints") / "tiny-qwen2-vl", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tiny models' ops are too small to split; on a busy 2-core machine several threads per op
    spin against each other (measured: 10x slower training). The whole session already runs with
    one thread unless ``OMP_NUM_THREADS`` says otherwise (above); this keeps a module at one thread
    even then."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test of a minute or so (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU; skipped without one (scripts/gpu_check.sh runs them)")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (docs/gpu.md; run scripts/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
