"""Uncertainty and significance of test accuracies: bootstrap intervals, McNemar's test, and
the complementarity of two classifiers (how often one is right where the other is wrong).

All functions take per-image correctness (``pred == label``), so they work for any classifier
whose test predictions were stored. scipy is used when installed; the same formulas are
computed by hand otherwise (the results agree to floating-point precision).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

try:  # optional: the same formulas are computed by hand without scipy
    from scipy.stats import binomtest, chi2
except ImportError:
    binomtest = chi2 = None

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 1000
# Below this many discordant pairs McNemar uses the exact binomial test, above it the
# chi-square approximation with continuity correction (the usual rule of thumb, b + c < 25).
EXACT_BELOW = 25


def correctness(labels: Sequence[int], predictions: Sequence[int]) -> np.ndarray:
    """Boolean array: was image i classified right (an unparseable ``-1`` counts as wrong)."""
    labels, predictions = np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)
    if labels.shape != predictions.shape:
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    return labels == predictions


def bootstrap_ci(correct: Sequence[bool], confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy: ``resamples`` resamplings of the test
    images with replacement, fixed ``seed`` so a table is reproducible."""
    correct = np.asarray(correct, dtype=float)
    if correct.size == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    means = np.concatenate([correct[rng.integers(0, correct.size, (chunk, correct.size))].mean(axis=1)
                            for chunk in _chunks(resamples, max(1, 2_000_000 // correct.size))])
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _chunks(total: int, size: int) -> list[int]:
    """Resamples drawn in chunks so memory stays bounded on large test splits."""
    return [min(size, total - start) for start in range(0, total, size)]


def _exact_binomial_p(smaller: int, n: int) -> float:
    if binomtest is None:
        return min(1.0, 2 * sum(math.comb(n, k) for k in range(smaller + 1)) / 2 ** n)
    return float(binomtest(smaller, n, 0.5).pvalue)


def _chi_square_1df_p(statistic: float) -> float:
    if chi2 is None:
        return math.erfc(math.sqrt(statistic / 2))  # survival function of chi-square, 1 degree of freedom
    return float(chi2.sf(statistic, 1))


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Paired McNemar test of two classifiers on the same images.

    ``b`` = images only A gets right, ``c`` = only B. With ``b + c < 25`` the exact two-sided
    binomial test (``min(1, 2 P[X <= min(b, c)])``, X ~ Bin(b + c, 1/2)); otherwise the
    chi-square statistic with continuity correction ``(|b - c| - 1)^2 / (b + c)``, 1 degree of
    freedom. ``test`` says which was used.
    """
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    n = b + c
    if n == 0:
        return {"a_only": b, "b_only": c, "test": "none (no discordant pairs)", "p_value": 1.0}
    if n < EXACT_BELOW:
        return {"a_only": b, "b_only": c, "test": "exact binomial", "p_value": _exact_binomial_p(min(b, c), n)}
    statistic = (abs(b - c) - 1) ** 2 / n
    return {"a_only": b, "b_only": c, "test": "chi-square, continuity-corrected", "statistic": statistic,
            "p_value": _chi_square_1df_p(statistic)}


def complementarity(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """The 2x2 counts of A right/wrong against B right/wrong and the oracle accuracy (right when
    either is right): the ceiling of any gate choosing between the two per image."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    return {"n": int(a.size), "both_right": int((a & b).sum()), "a_only": int((a & ~b).sum()),
            "b_only": int((~a & b).sum()), "both_wrong": int((~a & ~b).sum()),
            "oracle_accuracy": float((a | b).mean()) if a.size else 0.0}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) over seeds."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def fusion_statistics(labels: Sequence[int], predictions: dict) -> dict:
    """Statistics of stage 3's test predictions ``{"vlm", "head", "teacher" (or None), "gates":
    {name: preds}}``: a bootstrap interval per accuracy, McNemar of every gate against the VLM and
    the head, and the complementarity of the VLM with the teacher and with the head."""
    correct = {name: correctness(labels, preds) for name, preds in predictions.items()
               if name != "gates" and preds is not None}
    gates = {name: correctness(labels, preds) for name, preds in predictions["gates"].items()}
    return {
        "ci95": {**{name: bootstrap_ci(c) for name, c in correct.items()},
                 "gates": {name: bootstrap_ci(c) for name, c in gates.items()}},
        "mcnemar": {name: {"vs_vlm": mcnemar(c, correct["vlm"]), "vs_head": mcnemar(c, correct["head"])}
                    for name, c in gates.items()},
        "complementarity": {f"vlm_vs_{other}": complementarity(correct["vlm"], correct[other])
                            for other in ("teacher", "head") if other in correct},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": 0.95},
    }
