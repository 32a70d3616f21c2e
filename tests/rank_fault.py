"""Run a script under torchrun with rank 1 killed (SIGKILL) at its Nth call of a function (tests only).

    python -m torch.distributed.run --nproc_per_node 2 tests/rank_fault.py engine.vlm_answers.predict_vlm 1 \\
        train_gate.py --dataname toy ...

The other ranks run the script unchanged; the launcher then stops them, as after a real crash.
"""
import importlib
import os
import runpy
import signal
import sys


def kill_rank_one_at(target: str, call: int) -> None:
    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


if __name__ == "__main__":
    target, call, script, *rest = sys.argv[1:]
    if os.environ.get("RANK") == "1":
        kill_rank_one_at(target, int(call))
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
