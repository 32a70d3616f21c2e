"""scripts/mutations.py (``make mutations``): its anchor check and command line, without running mutants."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def mutations():
    spec = importlib.util.spec_from_file_location("mutations", REPO / "scripts" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutations"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("mutations", None)


def test_each_old_text_must_occur_exactly_once(mutations, tmp_path):
    (tmp_path / "a.py").write_text("x = 1\ny = 2\ny = 2\n")
    once = mutations.Mutant("once", "a.py", "x = 1", "x = 2", ("t",), "")
    mutations.check_anchors(tmp_path, [once])
    twice = mutations.Mutant("twice", "a.py", "y = 2", "y = 3", ("t",), "")
    gone = mutations.Mutant("gone", "a.py", "z = 3", "z = 4", ("t",), "")
    missing = mutations.Mutant("missing", "b.py", "x", "y", ("t",), "")
    with pytest.raises(mutations.AnchorError) as err:
        mutations.check_anchors(tmp_path, [once, twice, gone, missing])
    message = str(err.value)
    assert "twice: old text in a.py found 2 times" in message and "gone: old text in a.py found 0 times" in message
    assert "missing: old text in b.py missing file" in message and "  once:" not in message


def test_list_and_unknown_names(mutations, capsys):
    assert len(mutations.MUTANTS) >= 12 and len({m.name for m in mutations.MUTANTS}) == len(mutations.MUTANTS)
    assert mutations.main(["--list", "--only", "kl_direction"]) == 0
    assert capsys.readouterr().out.startswith("kl_direction: ")
    assert mutations.main(["--only", "no_such_mutant"]) == 2
    assert "no_such_mutant: no such mutant" in capsys.readouterr().err


def test_every_mutant_is_anchored_and_names_existing_tests(mutations):
    """A refactor that moves a mutant's code shows up here, not only in the long `make mutations`."""
    mutations.check_anchors(REPO, mutations.MUTANTS)
    for mutant in mutations.MUTANTS:
        for test in mutant.tests:
            path, _, name = test.partition("::")
            source = (REPO / path).read_text(encoding="utf-8")
            assert f"def {name.split('[')[0]}(" in source, f"{mutant.name}: no test {test}"
