"""Run a stage script and SIGKILL it at a chosen point, as a power cut or OOM killer would.

    python tests/kill_at.py utils.cache:store 2 train_distillation.py --dataname toy ...

kills the process at the start of the 2nd call of ``utils.cache.store`` (a module global or
``module:Class.method``); the script runs as ``__main__`` with the remaining arguments.
"""
import importlib
import os
import runpy
import signal
import sys


def arm(target: str, call: int) -> None:
    module_name, _, attribute = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    def killing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, killing)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target, call, script, *rest = sys.argv[1:]
    arm(target, int(call))
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
