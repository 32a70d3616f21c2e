"""The code's layout: one name per thing, scripts that hold their stage, strict layering."""
import ast
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO

SCRIPTS = ("generate_instructions", "train_vlm", "train_distillation", "train_gate", "demo", "predict")
PACKAGES = ("engine", "models", "data", "utils", "bench", "scripts", "tests")
# Which project packages each package may import (engine -> models -> data, utils).
ALLOWED = {"data": {"data", "utils"}, "utils": {"utils"}, "models": {"models", "data", "utils"},
           "engine": {"engine", "models", "data", "utils"}}
# The one exception: the preflight (engine/preflight.py, `python -m engine.preflight`) measures every
# stage's run as that stage will run it, so it reads each stage's flags through the stage script's own
# parser (a flag must mean there what it means in the stage) and times each stage's training steps with
# that stage's own training code. It is a measuring tool above the stages, like bench/, and nothing
# imports it.
MEASURES_EVERY_STAGE = "engine/preflight.py"


def project_files(*, tests: bool = True) -> list[Path]:
    files = [path for path in REPO.glob("*.py")]
    for package in PACKAGES:
        if package != "tests" or tests:
            files += (REPO / package).rglob("*.py")
    return sorted(files)


def imported_modules(path: Path):
    """``(module name, alias)`` of every import statement in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, alias.asname
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield f"{node.module}.{alias.name}", alias.asname


def is_project_module(name: str) -> bool:
    return name.split(".")[0] in (*PACKAGES, *SCRIPTS, "conftest", "pipeline", "oracles")


def is_module_file(name: str) -> bool:
    """Whether the dotted ``name`` is one of the project's modules (not a function or constant in one)."""
    path = REPO / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (REPO / "tests" / f"{name}.py").is_file() or path.is_dir()


def test_no_two_project_files_share_a_base_name():
    names = defaultdict(list)
    for path in project_files(tests=False):
        if path.stem not in ("__init__", "__main__"):
            names[path.stem].append(str(path.relative_to(REPO)))
    assert {stem: paths for stem, paths in names.items() if len(paths) > 1} == {}


def test_no_project_module_is_renamed_on_import():
    renamed = [f"{path.relative_to(REPO)}: {name} as {alias}" for path in project_files()
               for name, alias in imported_modules(path) if alias and is_module_file(name)]
    assert renamed == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_holds_its_stage(script):
    """get_args_parser(), FLAG_RULES, main(args), parse(argv) and the __main__ guard, in the script itself."""
    tree = ast.parse((REPO / f"{script}.py").read_text(encoding="utf-8"))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assigned = {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                if isinstance(target, ast.Name)}
    assert {"get_args_parser", "main", "parse"} <= set(functions) and "FLAG_RULES" in assigned
    assert functions["main"].args.args[0].arg == "args"
    guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(guards) == 1
    assert not (REPO / "engine" / "stages").exists()


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers_import_only_the_layers_below(package):
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in (REPO / package).rglob("*.py")
             for name, _ in imported_modules(path)
             if is_project_module(name) and name.split(".")[0] not in ALLOWED[package]
             and not (str(path.relative_to(REPO)) == MEASURES_EVERY_STAGE and name.split(".")[0] in SCRIPTS)]
    assert wrong == []


# Each stage's training procedures and the one script that runs them: no other stage, and no other
# library module, reaches into them (a contract between stages lives in a module of its own, e.g.
# engine/features.py, engine/vlm_answers.py, utils/records.py).
# A stage's own modules may import each other (engine/batch_api.py, stage 0's Batch API path, uses
# engine/instructions.py).
TRAINING_CODE = {"engine.instructions": "generate_instructions", "engine.batch_api": "generate_instructions",
                 "engine.vlm_train": "train_vlm", "engine.distill": "train_distillation", "engine.gate": "train_gate"}


def test_no_stage_imports_another_stages_training_code():
    files = [REPO / f"{script}.py" for script in SCRIPTS] + list((REPO / "engine").rglob("*.py")) \
        + list((REPO / "models").rglob("*.py"))
    wrong = []
    for path in files:
        own = ".".join(path.relative_to(REPO).with_suffix("").parts)
        if str(path.relative_to(REPO)) == MEASURES_EVERY_STAGE:  # times every stage (see MEASURES_EVERY_STAGE)
            continue
        for name, _ in imported_modules(path):
            owner = next((TRAINING_CODE[module] for module in TRAINING_CODE
                          if name == module or name.startswith(module + ".")), None)
            if owner is not None and path != REPO / f"{owner}.py" and TRAINING_CODE.get(own) != owner:
                wrong.append(f"{path.relative_to(REPO)} imports {name}")
    assert wrong == []


def test_nothing_imports_the_preflight():
    """The exception above stays one: no module builds on the preflight's access to every stage."""
    users = [f"{path.relative_to(REPO)}" for path in project_files(tests=False)
             for name, _ in imported_modules(path) if name == "engine.preflight" or name.startswith("engine.preflight.")]
    assert users == []
