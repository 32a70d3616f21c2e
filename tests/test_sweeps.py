"""Ablation sweeps and statistics: a sweep's heads trained together as one ensemble, each equal to
the head trained alone, one kept run per head setting, reused caches, the default head, stage 3's
--head and --seeds, the report's ablation tables, bootstrap intervals, McNemar's test and the
complementarity counts."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tests.pipeline import CONFIGS, ToyRun, trained_pipeline  # noqa: F401

PAPER_RUN = "depth=1,alpha=0.5,seed=42"


@dataclass(frozen=True)
class Swept(ToyRun):
    cache_before: dict | None = None  # distill/cache file times before the sweeps
    default_id: str | None = None     # the default head's id after the depth sweep


# ---------------------------------------------------------------- statistics (no models)

def test_bootstrap_interval_contains_the_accuracy_and_shrinks_with_more_images():
    from utils.stats import bootstrap_ci

    small = np.array([True] * 30 + [False] * 10)  # accuracy 0.75 on 40 images
    large = np.tile(small, 50)                     # the same accuracy on 2,000
    low, high = bootstrap_ci(small)
    assert low <= 0.75 <= high
    big_low, big_high = bootstrap_ci(large)
    assert big_low <= 0.75 <= big_high
    assert big_high - big_low < (high - low) / 3  # ~sqrt(50) = 7x narrower
    assert bootstrap_ci(small) == (low, high)     # fixed seed: the same interval every time
    assert bootstrap_ci(np.ones(10, bool)) == (1.0, 1.0)


@pytest.mark.parametrize("without_scipy", [False, True])
def test_mcnemar_matches_hand_computed_cases(without_scipy, monkeypatch):
    import utils.stats
    from utils.stats import mcnemar

    if without_scipy:  # the by-hand formulas must give the same numbers
        monkeypatch.setattr(utils.stats, "binomtest", None)
        monkeypatch.setattr(utils.stats, "chi2", None)
    # b = 1 image only A gets right, c = 6 only B: exact, p = 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125.
    a = [True] + [False] * 6 + [True] * 5
    b = [False] + [True] * 6 + [True] * 5
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"], result["test"]) == (1, 6, "exact binomial")
    assert result["p_value"] == pytest.approx(0.125)
    # b = 30, c = 10: chi-square (|30 - 10| - 1)^2 / 40 = 9.025, p = erfc(sqrt(9.025 / 2)) = 0.00266.
    a = [True] * 30 + [False] * 10 + [True] * 7
    b = [False] * 30 + [True] * 10 + [True] * 7
    result = mcnemar(a, b)
    assert result["test"].startswith("chi-square") and result["statistic"] == pytest.approx(9.025)
    assert result["p_value"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert result["p_value"] == pytest.approx(0.002663, abs=1e-6)
    assert mcnemar([True, False], [True, False])["p_value"] == 1.0  # no discordant images


def test_complementarity_counts_and_oracle():
    from utils.stats import complementarity

    a = np.array([1, 1, 0, 0, 1, 0], bool)
    b = np.array([1, 0, 1, 0, 0, 0], bool)
    result = complementarity(a, b)
    assert (result["both_right"], result["a_only"], result["b_only"], result["both_wrong"]) == (1, 2, 1, 2)
    assert result["oracle_accuracy"] == pytest.approx(4 / 6) and result["oracle_accuracy"] >= max(a.mean(), b.mean())


def test_head_spec_is_parsed_and_checked():
    from utils.errors import UserError
    from utils.sweeps import parse_head_spec, run_name

    assert parse_head_spec("depth=2,alpha=0.5") == {"depth": 2, "alpha": 0.5}
    assert run_name(2, 0.5, 0) == "depth=2,alpha=0.5,seed=0" and run_name(1, 0.0, 3) == "depth=1,alpha=0,seed=3"
    for bad in ("width=2", "depth=two", "", "depth"):
        with pytest.raises(UserError, match="--head"):
            parse_head_spec(bad)


# ---------------------------------------------------------------- sweeps train as ensembles (no models)

DIM, CLASSES = 12, 3
# Two depths, three alphas, three seeds: members of one stack differ in seed and alpha.
ENSEMBLE = [{"depth": 1, "alpha": 0.5, "seed": 0}, {"depth": 2, "alpha": 0.25, "seed": 1},
            {"depth": 1, "alpha": 0.0, "seed": 2}, {"depth": 1, "alpha": 0.5, "seed": 1}]


def head_tensors(seed: int = 0) -> tuple[dict, dict, dict]:
    generator = torch.Generator().manual_seed(seed)
    sizes = {"train": 45, "val": 16, "test": 20}
    features = {split: torch.randn(n, DIM, generator=generator) * 2 + 1 for split, n in sizes.items()}
    teacher = {split: torch.randn(n, CLASSES, generator=generator) for split, n in sizes.items()}
    labels = {split: torch.randint(0, CLASSES, (n,), generator=generator) for split, n in sizes.items()}
    return features, teacher, labels


def reference_head(features, teacher, labels, *, depth, alpha, seed, epochs, lr, batch_size, weight_decay=1e-4,
                   temperature=2.0) -> dict:
    """The head trained alone the plain way (nn.Module, nn.Dropout on the global generator,
    torch.optim.Adam): the best validation epoch's state."""
    from models.heads import DistillHead, distillation_loss

    torch.manual_seed(seed)
    head = DistillHead(DIM, CLASSES, depth)
    head.set_standardization(features["train"])
    optimizer = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    order = torch.randperm(len(labels["train"]), generator=torch.Generator().manual_seed(seed))
    best_acc, best_state = None, None
    for _ in range(epochs):
        head.train()
        for rows in order.split(batch_size):
            loss = distillation_loss(head(features["train"][rows]), teacher["train"][rows], labels["train"][rows],
                                     alpha, temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            acc = (head(features["val"]).argmax(-1) == labels["val"]).float().mean().item()
        if best_acc is None or acc > best_acc:
            best_acc, best_state = acc, {key: value.clone() for key, value in head.state_dict().items()}
    return best_state


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("batch_size, reshuffle", [(1, False), (4, True)])
def test_each_head_of_an_ensemble_equals_the_head_trained_alone(batch_size, reshuffle):
    """Stacked weights, one step for all, each member with its own seed (initialisation, dropout
    masks, order) and alpha: the same test predictions and weights within 1e-5 (relative) as the
    head trained alone with its setting (and alone is the plain training loop exactly)."""
    from engine.distill import train_head, train_heads

    features, teacher, labels = head_tensors()
    common = {"epochs": 3, "lr": 1e-2, "batch_size": batch_size, "standardize": True, "reshuffle": reshuffle}
    members = train_heads(features, teacher, labels, DIM, CLASSES, ENSEMBLE, **common)
    for setting, member in zip(ENSEMBLE, members):
        alone = train_head(features, teacher, labels, DIM, CLASSES, **setting, **common)
        assert member.history == alone.history and member.best_epoch == alone.best_epoch, setting
        assert member.best_state.keys() == alone.best_state.keys()
        for key, value in alone.best_state.items():
            assert relative_gap(member.best_state[key], value) <= 1e-5, (setting, key)
        with torch.no_grad():
            assert torch.equal(member.model(features["test"]).argmax(-1), alone.model(features["test"]).argmax(-1))
        if not reshuffle:  # the plain loop: one seeded order kept every epoch
            reference = reference_head(features, teacher, labels, **setting, epochs=3, lr=1e-2, batch_size=batch_size)
            assert all(torch.equal(reference[key], value) for key, value in alone.best_state.items()), setting


def test_members_of_different_seeds_or_alphas_differ():
    """Mutant-style: were the members' seeds or alphas not their own (one generator, one order or
    one alpha for all), these would be equal."""
    from engine.distill import train_heads

    features, teacher, labels = head_tensors(1)
    settings = [{"depth": 1, "alpha": 0.5, "seed": 0}, {"depth": 1, "alpha": 0.5, "seed": 1},
                {"depth": 1, "alpha": 0.0, "seed": 0}, {"depth": 1, "alpha": 0.5, "seed": 0}]
    initial = train_heads(features, teacher, labels, DIM, CLASSES, settings, epochs=1, lr=0.0)
    assert not torch.equal(initial[0].best_state["mlp.0.weight"], initial[1].best_state["mlp.0.weight"])  # seed
    assert torch.equal(initial[0].best_state["mlp.0.weight"], initial[2].best_state["mlp.0.weight"])
    trained = train_heads(features, teacher, labels, DIM, CLASSES, settings, epochs=2, lr=1e-2, batch_size=1)
    weights = [result.best_state["mlp.0.weight"] for result in trained]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])  # seed; alpha
    assert torch.equal(weights[0], weights[3])  # the same setting twice: the same head
    assert trained[0].history != trained[2].history


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_the_ensemble_loss_is_each_heads_own_loss_bit_for_bit(rows):
    """distillation_loss on (E, B, C): each head's loss and gradient round exactly as on its own
    (B, C) batch (the summation orders of kl_div and nll_loss kept), whatever E."""
    from models.heads import distillation_loss

    generator = torch.Generator().manual_seed(rows)
    members = 7
    student = torch.randn(members, rows, CLASSES + 2, generator=generator, requires_grad=True)
    teacher = torch.randn(members, rows, CLASSES + 2, generator=generator)
    targets = torch.randint(0, CLASSES + 2, (members, rows), generator=generator)
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0, 0.3, 0.058]  # 0.058: 1 - alpha rounds otherwise in float32 than in double
    losses = distillation_loss(student, teacher, targets, alphas, 2.0)
    losses.sum().backward()
    for i in range(members):
        alone = student.detach()[i].clone().requires_grad_()
        loss = distillation_loss(alone, teacher[i], targets[i], alphas[i], 2.0)
        loss.backward()
        assert torch.equal(loss, losses[i]) and torch.equal(alone.grad, student.grad[i]), i


def test_member_adam_is_adam_on_each_member():
    """Each member's slice of a stacked parameter takes the fused Adam's own steps on that member
    alone (bit for bit), and Adam's steps (weight decay added to the gradient)."""
    from engine.batches import MemberAdam

    torch.manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 5, 7))
    alone = [torch.nn.Parameter(stacked.detach()[i].clone()) for i in range(3)]
    reference = [torch.nn.Parameter(stacked.detach()[i].clone()) for i in range(3)]
    member_adam = MemberAdam([stacked], lr=1e-2, weight_decay=1e-1)
    fused = [torch.optim.Adam([p], lr=1e-2, weight_decay=1e-1, fused=True) for p in alone]
    plain = [torch.optim.Adam([p], lr=1e-2, weight_decay=1e-1, foreach=False) for p in reference]
    for _ in range(5):
        grad = torch.randn(3, 5, 7)
        member_adam.zero_grad()
        stacked.grad = grad.clone()
        member_adam.step()
        for i in range(3):
            for params, optimizer in ((alone, fused), (reference, plain)):
                params[i].grad = grad[i].clone()
                optimizer[i].step()
    for i in range(3):
        assert torch.equal(stacked.detach()[i], alone[i].detach())
        torch.testing.assert_close(stacked.detach()[i], reference[i].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("split", ["train", "val"])
def test_each_gate_of_an_ensemble_equals_the_gate_trained_alone(split):
    """Stage 3's variants x seeds as one ensemble (with --gate_train_split val each seed fits and
    picks on its own halves of validation): each gate is bit for bit the gate trained alone."""
    from engine.gate import GateData, gate_training_data, train_gate, train_gates
    from models.gates import GATES

    def gate_data(n: int, seed: int) -> GateData:
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, CLASSES, (n,), generator=generator)
        onehot = torch.nn.functional.one_hot(labels, CLASSES).float()
        return GateData(vlm_pred=labels, vlm_signal=onehot * (torch.rand(n, 1, generator=generator) > 0.3),
                        head_logits=torch.randn(n, CLASSES, generator=generator) + onehot, labels=labels)

    data = {"train": gate_data(30, 0), "val": gate_data(21, 1)}
    members = [(name, seed, *gate_training_data(data, split, seed)) for seed in (0, 1) for name in GATES]
    together = train_gates(members, CLASSES, epochs=3, lr=1e-2, batch_size=1)
    for (name, seed, fit, select), member in zip(members, together):
        alone = train_gate(name, CLASSES, fit, select, epochs=3, lr=1e-2, batch_size=1, seed=seed)
        assert member.history == alone.history and member.best_epoch == alone.best_epoch, (name, seed)
        assert all(torch.equal(member.best_state[key], value) for key, value in alone.best_state.items()), (name, seed)
    # Mutant-style: the seeds are the gates' own.
    assert not torch.equal(together[0].best_state["linear.weight"], together[len(GATES)].best_state["linear.weight"])


def test_a_diverged_member_stops_alone():
    """A member whose loss turns non-finite gets fit's own DivergedError; the others train on."""
    from engine.fit import Selection, fit_members
    from utils.outputs import DivergedError

    model = torch.nn.Linear(1, 1)
    losses = iter([[1.0, float("nan"), 0.5], [0.8, float("nan"), 0.4]])
    results = fit_members(model, 2, lambda epoch: {"train_loss": next(losses)},
                          lambda: [{"val_loss": 1.0, "val_acc": 0.5}] * 3, lambda index: {"member": index},
                          names=["head (a)", "head (b)", "head (c)"], flags="--lr")
    assert isinstance(results[1], DivergedError)
    assert str(results[1]).startswith("the head (b)'s loss in epoch 1 is nan: training diverged")
    assert all(isinstance(results[i], Selection) and len(results[i].history) == 2 for i in (0, 2))
    assert results[2].best_state == {"member": 2} and results[2].best_epoch == 1


# ---------------------------------------------------------------- sweeps on the toy pipeline

@pytest.fixture(scope="module")
def swept(trained_pipeline, tmp_path_factory) -> Swept:  # noqa: F811
    """A copy of the trained toy pipeline with a depth sweep and an alpha sweep of stage 2 (3 head
    epochs each) and stage 3 on the paper's head with two seeds; stage 1 and the caches are reused."""
    import train_distillation
    import train_gate

    root = tmp_path_factory.mktemp("swept")
    shutil.copytree(trained_pipeline.output_dir, root, dirs_exist_ok=True)
    pipeline = ToyRun(trained_pipeline.data_root, root, trained_pipeline.vlm_model)
    cache = pipeline.stage("distill") / "cache"
    before = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}
    stage2 = pipeline.argv("--config", str(CONFIGS / "toy_distill.yaml"), "--epochs", "3")
    train_distillation.main(train_distillation.parse([*stage2, "--depth", "1", "2", "3"]))
    default_id = json.loads((pipeline.stage("distill") / "meta.json").read_text())["head_id"]
    train_distillation.main(train_distillation.parse([*stage2, "--alpha", "0", "1"]))  # no paper setting: the default stays
    train_gate.main(train_gate.parse(pipeline.argv("--config", str(CONFIGS / "toy_gate.yaml"), "--gate", "all", "--seeds", "0", "1")))
    return Swept(pipeline.data_root, root, pipeline.vlm_model, cache_before=before, default_id=default_id)


def test_each_setting_is_kept_and_the_paper_setting_is_the_default(swept):
    runs = swept.stage("distill") / "runs"
    names = sorted(path.name for path in runs.iterdir())
    assert names == ["depth=1,alpha=0,seed=42", "depth=1,alpha=0.5,seed=42", "depth=1,alpha=1,seed=42",
                     "depth=2,alpha=0.5,seed=42", "depth=3,alpha=0.5,seed=42"]
    for name in names:
        for file in ("head.pt", "metrics.json", "curves.png", "log.txt", "run.json", "meta.json"):
            assert (runs / name / file).is_file(), f"{name}/{file}"
        meta = json.loads((runs / name / "meta.json").read_text())
        assert run_of(meta) == name
        assert json.loads((runs / name / "run.json").read_text())["args"]["depth"] == meta["depth"]
    heads = {json.loads((runs / name / "meta.json").read_text())["head_id"] for name in names}
    assert len(heads) == len(names)  # five different heads, none overwritten by another
    top = json.loads((swept.stage("distill") / "meta.json").read_text())
    # The alpha sweep (without alpha 0.5) left the default alone: the depth sweep's paper run.
    assert top["run"] == PAPER_RUN and top["head_id"] == swept.default_id
    assert top == json.loads((runs / PAPER_RUN / "meta.json").read_text())


def run_of(meta: dict) -> str:
    from utils.sweeps import run_name

    return run_name(meta["depth"], meta["alpha"], meta["seed"])


def test_a_swept_head_equals_the_head_trained_alone(swept):
    """The depth sweep trained depth 1, 2 and 3 as one ensemble: its depth-2 head is the head
    train_head gives alone on the same cached features with the toy config's settings."""
    from data.datasets import load_dataset
    from engine.distill import train_head

    cache = swept.stage("distill") / "cache"
    splits = load_dataset(swept.data_root, "toy", swept.output_dir)
    features = {s: torch.load(cache / f"vlm_features_{s}.pt", weights_only=True)["values"] for s in ("train", "val")}
    teacher = {s: torch.load(cache / f"teacher_logits_{s}.pt", weights_only=True)["values"] for s in features}
    labels = {s: torch.tensor([sample.label for sample in splits.split(s)]) for s in features}
    alone = train_head(features, teacher, labels, features["train"].shape[1], len(splits.class_names), depth=2,
                       alpha=0.5, seed=42, epochs=3, lr=1e-3, batch_size=16, standardize=True)
    swept_head = torch.load(swept.stage("distill") / "runs" / "depth=2,alpha=0.5,seed=42" / "head.pt",
                            weights_only=True)["state_dict"]
    assert swept_head.keys() == alone.best_state.keys()
    for key, value in alone.best_state.items():
        assert relative_gap(swept_head[key], value) <= 1e-5, key


def test_sweeps_reuse_the_feature_cache(swept):
    cache = swept.stage("distill") / "cache"
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == swept.cache_before


def test_gate_seeds_are_kept_and_the_first_is_published(swept):
    gate = swept.stage("gate")
    first, second = (json.loads((gate / "runs" / PAPER_RUN / f"seed={s}" / "metrics.json").read_text())
                     for s in (0, 1))
    assert (first["seed"], second["seed"]) == (0, 1)
    assert first["head_run"] == PAPER_RUN and first["head_id"] == swept.default_id
    top = json.loads((gate / "metrics.json").read_text())
    assert top["seed"] == 0 and top["gates"] == first["gates"]


def test_statistics_come_from_the_tabled_predictions(swept):
    from utils.stats import bootstrap_ci, mcnemar

    metrics = json.loads((swept.stage("gate") / "metrics.json").read_text())
    preds = metrics["test_predictions"]
    labels = np.array(preds["labels"])
    right = {key: np.array(preds[key]) == labels for key in ("vlm", "head", "teacher")}
    assert right["vlm"].mean() == pytest.approx(metrics["vlm"]["accuracy"])
    assert right["head"].mean() == pytest.approx(metrics["head"]["accuracy"])
    for other in ("teacher", "head"):
        pair = metrics["complementarity"][f"vlm_vs_{other}"]
        assert pair["oracle_accuracy"] == pytest.approx((right["vlm"] | right[other]).mean())
        assert pair["oracle_accuracy"] >= max(right["vlm"].mean(), right[other].mean())
        assert pair["both_right"] + pair["a_only"] + pair["b_only"] + pair["both_wrong"] == len(labels)
    for name, row in metrics["gates"].items():
        gate_right = np.array(preds["gates"][name]) == labels
        assert gate_right.mean() == pytest.approx(row["accuracy"])
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
        assert list(bootstrap_ci(gate_right)) == row["ci95"]
        assert row["mcnemar_vs_vlm"] == mcnemar(gate_right, right["vlm"])
        assert row["mcnemar_vs_head"] == mcnemar(gate_right, right["head"])
    table = (swept.stage("gate") / "table.md").read_text()
    assert "oracle accuracy %" in table and "McNemar p vs VLM" in table


def test_stage3_fuses_a_chosen_head_and_refuses_a_missing_one(swept, capsys):
    import train_gate
    from utils.errors import run_cli

    gate = swept.stage("gate")
    top_before = (gate / "metrics.json").read_bytes()
    argv = swept.argv("--config", str(CONFIGS / "toy_gate.yaml"))
    train_gate.main(train_gate.parse([*argv, "--head", "depth=2,alpha=0.5"]))
    chosen = json.loads((gate / "runs" / "depth=2,alpha=0.5,seed=42" / "seed=42" / "metrics.json").read_text())
    head_meta = json.loads((swept.stage("distill") / "runs" / "depth=2,alpha=0.5,seed=42" / "meta.json").read_text())
    assert chosen["head_run"] == "depth=2,alpha=0.5,seed=42" and chosen["head_id"] == head_meta["head_id"]
    assert (gate / "metrics.json").read_bytes() == top_before  # the demo's gate still fits the default head
    assert "Head fused: `depth=2,alpha=0.5,seed=42`" in (gate / "runs/depth=2,alpha=0.5,seed=42/seed=42/table.md").read_text()

    capsys.readouterr()
    assert run_cli(train_gate.main, [*argv, "--head", "depth=4,alpha=0.5"], parse=train_gate.parse) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --head depth=4,alpha=0.5: no such head run") and len(err.splitlines()) == 1
    assert "depth=2,alpha=0.5,seed=42" in err and PAPER_RUN in err
    assert (gate / "metrics.json").read_bytes() == top_before


def test_report_ablation_tables_have_one_row_per_setting(swept, capsys):
    from utils.report import main

    out = swept.output_dir
    main(["--output_dir", str(out), "--datasets", "toy", "--ablation", "depth"])
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| depth")]
    assert [row.split(" | ")[0] for row in rows] == ["| 1 *", "| 2", "| 3"]
    head = {d: json.loads((out / "toy/distill/runs" / f"depth={d},alpha=0.5,seed=42/metrics.json").read_text())
            for d in (1, 2, 3)}
    assert f"| 3 | {100 * head[3]['accuracy']:.2f} | not run |" == rows[2]  # no gate fused depth 3
    # Depth 1 has two gate seeds (--gate all): mean ± std of the paper's gate over them, whichever was selected.
    fused = [json.loads((out / "toy/gate/runs" / PAPER_RUN / f"seed={s}/metrics.json").read_text())
             for s in (0, 1)]
    accs = [m["gates"]["concat_linear"]["accuracy"] for m in fused]
    assert f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f} (n=2)" in rows[0]
    assert (out / "toy" / "ablation_depth.png").stat().st_size > 1000

    main(["--output_dir", str(out), "--datasets", "toy", "--ablation", "alpha"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| 0", "| 0.5 *", "| 1"]

    main(["--output_dir", str(out), "--datasets", "toy", "--ablation", "gate"])
    text = capsys.readouterr().out
    assert "| concat_linear * |" in text and text.count("(n=2)") == 5
    assert (out / "toy" / "ablation_gate.png").is_file()


def test_report_ablation_without_runs_names_the_command(tmp_path):
    from utils.ablation import build_ablation
    from utils.errors import UserError

    (tmp_path / "FI" / "distill").mkdir(parents=True)
    with pytest.raises(UserError, match=r"python train_distillation.py --dataname FI --depth 1 2 3 4 5"):
        build_ablation(tmp_path, ["FI"], "depth")
