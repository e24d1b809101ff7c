"""Accuracy, HellaSwag's length-normalised accuracy and corpus-level macro-F1, with standard errors."""

import math

import numpy as np


def accuracy(preds: list[int], golds: list[int]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-evaluation-harness)."""
    hits = np.array(preds) == np.array(golds)
    n = len(hits)
    stderr = math.sqrt(hits.var(ddof=1) / n) if n > 1 else float("nan")
    return float(hits.mean()), stderr


def macro_f1(preds: list[int], golds: list[int]) -> float:
    """sklearn's f1_score(golds, preds, average="macro"): labels are those seen in either, F1 0 when empty."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    scores = []
    for label in np.union1d(preds, golds):
        tp = np.sum((preds == label) & (golds == label))
        fp, fn = np.sum((preds == label) & (golds != label)), np.sum((preds != label) & (golds == label))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def macro_f1_stderr(preds: list[int], golds: list[int], iters: int = 1000, seed: int = 1234) -> float:
    """Bootstrap standard error of macro-F1 (documents resampled with replacement)."""
    preds, golds = np.asarray(preds), np.asarray(golds)
    rng = np.random.default_rng(seed)
    n = len(preds)
    samples = [macro_f1(preds[i], golds[i]) for i in (rng.integers(0, n, n) for _ in range(iters))]
    return float(np.std(samples, ddof=1))


def prediction_counts(preds: list[int], n_choices: int) -> list[int]:
    return np.bincount(np.asarray(preds, dtype=int), minlength=n_choices).tolist()


def one_class_warning(counts: list[int], threshold: float = 0.9) -> str | None:
    """A warning when one answer takes over threshold of the predictions (a majority-class floor)."""
    total = sum(counts)
    if total and max(counts) > threshold * total:
        top = int(np.argmax(counts))
        return f"choice {top} is predicted for {max(counts)}/{total} documents: the score may be a majority-class floor"
    return None
