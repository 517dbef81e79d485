"""Evaluation, in one module: per-label thresholds, the metrics, the held-out protocol, and a
bundle scored on labelled data. Training (per epoch and for the bundle), Tune and both sweeps,
``emotions ablate``, the precision gate and ``emotions evaluate`` all score through here.

Held out. Thresholds fitted on the data they are scored on flatter a model: on the dev split the
in-sample macro-F1 of the default bundle was 0.034 above its score on comments neither the model
nor its thresholds saw, while the two-fold estimate below was within 0.005 of it. So every number
that picks or reports a model is held out (``heldout_metrics``): the validation split cut in two
stratified halves (``heldout_halves``), thresholds fitted on one half and scored on the other, both
ways, averaged. A bundle's own thresholds are still fitted on all of the validation split; metrics
at them on that split are in-sample and are labelled so. Labels with no positive example in a
scored set are left out of its macro averages (and listed), so sets of different sizes compare.

Every function takes ``labels`` [n, 28] (0/1) and ``probs`` [n, 28] (in [0, 1]) in ``EMOTIONS``
column order; a label is predicted when its probability is >= its threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from emotions.labels import EMOTIONS, NUM_LABELS

GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)  # candidate thresholds
SUMMARY = ("macro_f1", "weighted_f1", "micro_f1", "accuracy", "macro_precision", "macro_recall")
HELDOUT_SEED = 0  # the split of the validation rows into halves
RESAMPLES = 1000  # bootstrap resamples for an interval on a paired change

log = logging.getLogger("emotions.evaluation")


# ----------------------------------------------------------------------------- thresholds


def fit_thresholds(probs: np.ndarray, labels: np.ndarray, fallback: float = 0.5, grid: np.ndarray = GRID) -> np.ndarray:
    """[n, L] probabilities and 0/1 labels -> [L] thresholds, each the grid value with the best F1
    for its label (ties go to the higher threshold: fewer false positives on new data).
    A label with no positive example keeps ``fallback``: there is nothing to fit.

    Robust variants for labels with few positives (shrinking toward a pooled threshold by the
    label's positive count, or smoothing each F1 curve) were measured on held-out halves of dev
    and did not win (``benchmarks/threshold_choices.py``), so the plain best-F1 choice stays."""
    f1, support = f1_curves(probs, labels, grid)
    best = len(grid) - 1 - np.argmax(f1[::-1], axis=0)  # last index of the max
    thresholds = grid[best].astype(np.float32)
    thresholds[support == 0] = fallback
    return thresholds


def f1_curves(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """([grid, L] each label's F1 at each grid threshold, [L] positives per label)."""
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ in shape")
    positive = labels.astype(bool)
    # [grid, n, L] predictions are too big for large n; count per grid value instead.
    tp = np.stack([((probs >= t) & positive).sum(0) for t in grid])  # [grid, L]
    predicted = np.stack([(probs >= t).sum(0) for t in grid])  # [grid, L]
    support = positive.sum(0)  # [L]
    return 2 * tp / np.maximum(predicted + support[None, :], 1), support


# ----------------------------------------------------------------------------- metrics


def _check_inputs(labels: np.ndarray, probs: np.ndarray, thresholds) -> np.ndarray:
    """Validate shapes; return thresholds broadcast to [28]."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    if labels.shape != probs.shape or labels.ndim != 2 or labels.shape[1] != NUM_LABELS:
        raise ValueError(
            f"labels has shape {labels.shape} and probs has shape {probs.shape}; both must be "
            f"[n_examples, {NUM_LABELS}] with columns in EMOTIONS order."
        )
    th = np.asarray(thresholds, dtype=float)
    if th.ndim == 0:
        th = np.full(NUM_LABELS, float(th))
    if th.shape != (NUM_LABELS,):
        raise ValueError(f"thresholds has shape {th.shape}; pass a scalar or shape ({NUM_LABELS},).")
    return th


def compute_metrics(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | float) -> dict:
    """F1/precision/recall (macro over the labels present, weighted, micro), exact-match accuracy,
    per-label scores, and ``labels_absent``: the labels with no positive example here, left out of
    the macro averages (their F1 is 0 or undefined whatever the model does)."""
    th = _check_inputs(labels, probs, thresholds)
    y_true = np.asarray(labels).astype(int)
    y_pred = (np.asarray(probs) >= th[None, :]).astype(int)  # [n, 28] >= [1, 28]
    present = [j for j in range(NUM_LABELS) if y_true[:, j].any()]
    out: dict = {}
    for avg in ("macro", "weighted", "micro"):
        if present:
            p, r, f, _ = precision_recall_fscore_support(
                y_true, y_pred, average=avg, zero_division=0, labels=present if avg == "macro" else None
            )
        else:
            p = r = f = 0.0
        out[f"{avg}_f1"] = float(f)
        if avg == "macro":
            out["macro_precision"], out["macro_recall"] = float(p), float(r)
    out["accuracy"] = float(accuracy_score(y_true, y_pred))  # whole label set must match
    out["labels_absent"] = [EMOTIONS[j] for j in range(NUM_LABELS) if j not in present]
    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, average=None, zero_division=0, labels=list(range(NUM_LABELS))
    )
    out["per_label"] = {
        name: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
            "threshold": float(th[i]),
        }
        for i, name in enumerate(EMOTIONS)
    }
    return out


# ----------------------------------------------------------------------------- held out


def heldout_halves(labels: np.ndarray, seed: int = HELDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """[n, L] 0/1 labels -> two halves (row indices), seeded, and stratified so that every label
    with 2 or more positives has positives in both: labels are dealt from the rarest up, each
    label's rows not yet dealt alternating between the halves (starting with the smaller one);
    rows without labels fill the halves to equal size."""
    labels = np.asarray(labels).astype(bool)
    rng = np.random.default_rng(seed)
    side = np.full(len(labels), -1)
    for j in np.argsort(labels.sum(0), kind="stable"):
        rows = rng.permutation(np.flatnonzero(labels[:, j] & (side < 0)))
        have = [int(((side == h) & labels[:, j]).sum()) for h in (0, 1)]
        first = int(have[1] < have[0])  # the half with fewer of this label's positives goes first
        side[rows] = (np.arange(len(rows)) + first) % 2
    rest = rng.permutation(np.flatnonzero(side < 0))
    short = len(labels) // 2 - int((side == 0).sum())  # rows half 0 still needs
    side[rest] = np.where(np.arange(len(rest)) < short, 0, 1)
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1)


def heldout_metrics(
    labels: np.ndarray, probs: np.ndarray, *, fallback: float = 0.5, seed: int = HELDOUT_SEED
) -> dict | None:
    """The held-out estimate: thresholds fitted on one half of these rows, the metrics scored on
    the other, both ways, averaged (``SUMMARY`` keys), with each fold's thresholds' source rows
    never among its scored rows. ``labels_absent``: labels absent from either scored half.
    None for a set too small to halve (a half would be empty)."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    _check_inputs(labels, probs, 0.5)
    halves = _folds(labels, seed)
    if not all(len(half) for half in halves[0]):
        return None
    folds = []
    for fit, scored in halves:
        thresholds = fit_thresholds(probs[fit], labels[fit], fallback=fallback)
        folds.append(compute_metrics(labels[scored], probs[scored], thresholds))
    out = {key: float(np.mean([fold[key] for fold in folds])) for key in SUMMARY}
    out["labels_absent"] = sorted({name for fold in folds for name in fold["labels_absent"]}, key=EMOTIONS.index)
    out.update(seed=seed, examples=int(len(labels)))
    return out


def heldout_macro_f1(
    labels: np.ndarray, probs: np.ndarray, *, fallback: float = 0.5, seed: int = HELDOUT_SEED
) -> float:
    """``heldout_metrics``' macro-F1 alone (nan for a set too small to halve): what epochs, trials
    and the choice of a stage's head compare."""
    metrics = heldout_metrics(labels, probs, fallback=fallback, seed=seed)
    return float("nan") if metrics is None else metrics["macro_f1"]


def validation_scores(labels: np.ndarray, probs: np.ndarray, *, fallback: float = 0.5) -> dict[str, float]:
    """What every epoch reports, in training and in the head sweep: the validation loss and
    macro-F1 three ways. ``val_macro_f1_heldout`` (thresholds fitted on one half, scored on the
    other) is what runs are compared by; the one at 0.5 needs no thresholds; the in-sample one
    (thresholds fitted on the rows scored) flatters and chooses nothing."""
    eps = 1e-7
    loss = float(-np.mean(labels * np.log(probs + eps) + (1 - labels) * np.log(1 - probs + eps)))
    in_sample = compute_metrics(labels, probs, fit_thresholds(probs, labels, fallback=fallback))
    return {
        "val_loss": loss,
        "val_macro_f1_heldout": heldout_macro_f1(labels, probs, fallback=fallback),
        "val_macro_f1": compute_metrics(labels, probs, 0.5)["macro_f1"],
        "val_macro_f1_in_sample": in_sample["macro_f1"],
    }


def _folds(labels: np.ndarray, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    halves = heldout_halves(labels, seed)
    return halves, halves[::-1]


def macro_f1(labels: np.ndarray, predicted: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Macro-F1 over the labels with positives, for [n, L] 0/1 ``labels`` and ``predicted``;
    ``weights`` [k, n] (bootstrap counts) -> [k] scores, one per row of weights. The same number as
    ``compute_metrics``' macro_f1 (for weights of ones), in a form that vectorises resamples."""
    labels, predicted = np.asarray(labels).astype(np.float64), np.asarray(predicted).astype(np.float64)
    w = np.ones((1, len(labels))) if weights is None else np.asarray(weights, dtype=np.float64)
    tp, positives, chosen = w @ (labels * predicted), w @ labels, w @ predicted  # [k, L]
    f1 = 2 * tp / np.maximum(positives + chosen, 1e-12)
    present = positives > 0
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def paired_change(
    labels: np.ndarray,
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    seed: int = HELDOUT_SEED,
    resamples: int = RESAMPLES,
) -> dict:
    """Held-out macro-F1 of ``candidate`` probabilities minus ``reference``'s on the same rows, at
    thresholds fitted on ``reference`` (as a bundle's are) on the other half, both ways, averaged;
    with a 95% paired bootstrap interval (rows resampled within each scored half, the same rows
    for both sides) and the share of rows whose label set changes at thresholds fitted on all rows."""
    labels = np.asarray(labels).astype(bool)
    rng = np.random.default_rng(seed)
    point, spread = {"reference": 0.0, "candidate": 0.0}, np.zeros(resamples)
    for fit, scored in _folds(labels, seed):
        thresholds = fit_thresholds(reference[fit], labels[fit])
        y, a, b = labels[scored], reference[scored] >= thresholds, candidate[scored] >= thresholds
        point["reference"] += float(macro_f1(y, a)[0]) / 2
        point["candidate"] += float(macro_f1(y, b)[0]) / 2
        counts = rng.multinomial(len(scored), np.full(len(scored), 1 / len(scored)), size=resamples)
        spread += (macro_f1(y, b, counts) - macro_f1(y, a, counts)) / 2
    thresholds = fit_thresholds(reference, labels)
    changed = ((reference >= thresholds) != (candidate >= thresholds)).any(axis=1).mean()
    low, high = np.percentile(spread, [2.5, 97.5])
    return {
        "heldout_macro_f1_reference": point["reference"],
        "heldout_macro_f1_candidate": point["candidate"],
        "change": point["candidate"] - point["reference"],
        "interval_95": [float(low), float(high)],
        "rows_changed": float(changed),
        "examples": int(len(labels)),
        "resamples": resamples,
        "seed": seed,
    }


# ----------------------------------------------------------------------------- reports


def evaluation_report(
    labels: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    *,
    in_sample: bool,
    source: str = "",
    model: str = "",
    fallback: float = 0.5,
) -> dict:
    """The held-out estimate first, then the metrics at 0.5 and at ``thresholds``; ``in_sample``:
    whether ``thresholds`` were fitted on these very rows (then ``at_thresholds`` flatters, and
    says so), or elsewhere (then it is the true test)."""
    at_thresholds = compute_metrics(labels, probs, thresholds)
    return {
        "source": source,
        "model": model,
        "n_examples": int(np.asarray(labels).shape[0]),
        "labels_absent": at_thresholds["labels_absent"],
        "heldout": heldout_metrics(labels, probs, fallback=fallback),
        "at_0.5": compute_metrics(labels, probs, 0.5),
        "at_thresholds": at_thresholds,
        "thresholds_in_sample": bool(in_sample),
    }


def evaluate_bundle(
    model: str | Path,
    data: str,
    report_dir: str | Path | None = None,
    *,
    text_column: str = "text",
    labels_column: str = "labels",
    label_format: str = "auto",
    batch_size: int = 64,
) -> dict:
    """Predict ``data`` with the bundle at ``model``; optionally write metrics.json, report.md and
    per_label_f1.png into ``report_dir`` (a local folder or a URI). Returns the report dict. On
    data its thresholds never saw, the metrics at its thresholds are the true test; on the data
    they were fitted on they are in-sample, and the report says so."""
    from emotions.bundle import load_bundle
    from emotions.data import load_labelled
    from emotions.evaluation_report import format_summary, write_evaluation_report

    bundle = load_bundle(model)
    labelled = load_labelled(data, text_column=text_column, labels_column=labels_column, label_format=label_format)
    log.info(
        "evaluating bundle %s (hash %s) on %d examples from %s",
        bundle.path,
        bundle.hash,
        len(labelled),
        labelled.source,
    )
    probs = bundle.predict_proba(labelled.texts, batch_size=batch_size)
    fitted_on = thresholds_source(bundle.config)
    report = evaluation_report(
        labelled.labels,
        probs,
        bundle.thresholds,
        in_sample=data == fitted_on,
        source=labelled.source,
        model=f"{bundle.path} ({bundle.hash})",
    )
    report["thresholds_fitted_on"] = fitted_on
    if report_dir is not None:
        write_evaluation_report(report, report_dir, title=f"Evaluation of {str(model).rstrip('/').rsplit('/', 1)[-1]}")
    log.info("\n%s", format_summary(report))
    return report


def thresholds_source(config: dict) -> str:
    """The data a bundle's thresholds were fitted on (its training config's threshold split)."""
    data = config.get("data", {})
    return data.get(config.get("thresholds", {}).get("split", "validation"), "")
