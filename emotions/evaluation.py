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

import dataclasses
import logging
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from emotions.labels import EMOTIONS, NUM_LABELS

GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)  # candidate thresholds
SUMMARY = ("macro_f1", "weighted_f1", "micro_f1", "accuracy", "macro_precision", "macro_recall")
DEFAULT_SHRINK = 40.0  # the threshold prior, in positives (ThresholdRule)
DEFAULT_PRIOR = "share"
DEFAULT_MAX_SHARE_RATIO = 2.0  # tagged at most this many times as often as true, on the fitting rows
DEFAULT_MIN_POSITIVES = 40  # fewer positives than this: named in the log and metrics.json
SHARE_JUDGED = 10  # labels with fewer positives in a scored set are left out of its largest share ratio
HELDOUT_SEED = 0  # the split of the validation rows into halves
RESAMPLES = 1000  # bootstrap resamples for an interval on a paired change

log = logging.getLogger("emotions.evaluation")


# ----------------------------------------------------------------------------- thresholds


@dataclasses.dataclass(frozen=True)
class ThresholdRule:
    """How per-label thresholds are fitted (``thresholds`` in a training config).

    Each label starts from its best-F1 grid value on the fitting rows. On a label with few
    positives that value is a guess (the quickstart's relief threshold, 0.07 from a handful of
    positives, tagged relief on 14.6% of unseen comments against a true 0.2%), so two guards:

    - ``shrink`` m: a label with n positives gets (n * own + m * target) / (n + m): a prior worth
      m positives. A label with many positives keeps close to its own value; one with few leans
      on the target. ``prior="share"`` (default): the target is the label's own share-matching
      value, the lowest grid value at which it is tagged no more often than it is true; it lives
      in the label's own probability scale, however the loss calibrated it. ``prior="pooled"``:
      the one grid value best for macro-F1 over all labels; it won on bundles trained with
      positive weights but cost plain-BCE bundles, whose rare labels score far below the pooled
      value (-0.023 on an earlier `default` bundle).
    - ``max_share_ratio`` c: the threshold is then raised, where needed, to the lowest grid value
      at which its label is tagged on at most c times as many fitting rows as it is true.

    Chosen on held-out halves of dev over 10 split seeds, by macro-F1 and by the largest ratio of
    tagged to true share (``benchmarks/threshold_choices.py``, docs/results.md): against each
    label's best-F1 value alone, +0.0036 macro-F1 on the ``default`` bundle (worst label 3.2x ->
    2.1x its share) and +0.0063 on the quickstart's (3.8x -> 2.3x; fitted on 1,000 rows, as the
    quickstart did, best F1 tagged a label at 15.3x). On a barely trained plain-BCE bundle, where
    best F1 tags every label at about 40x its share, the cap costs 0.020 macro-F1 and brings
    that to 2.4x: F1 there rewards over-tagging. Labels with fewer than ``min_positives``
    positives are named in the training log and metrics.json.
    A label with no positive example keeps ``fallback``: there is nothing to fit."""

    fallback: float = 0.5
    shrink: float = DEFAULT_SHRINK
    prior: str = DEFAULT_PRIOR  # "pooled" or "share": what a label's threshold is shrunk toward
    max_share_ratio: float | None = DEFAULT_MAX_SHARE_RATIO
    min_positives: int = DEFAULT_MIN_POSITIVES

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


PLAIN = ThresholdRule(shrink=0.0, max_share_ratio=None)  # each label's best-F1 value alone


def rule_of(config: dict) -> ThresholdRule:
    """The rule a bundle's thresholds were fitted by, from its training config (a dict). Bundles
    made before the rule had settings were fitted by each label's best-F1 value alone."""
    section = {**PLAIN.as_dict(), **config.get("thresholds", {})}
    return ThresholdRule(**{field.name: section[field.name] for field in dataclasses.fields(ThresholdRule)})


def fit_thresholds(
    probs: np.ndarray, labels: np.ndarray, rule: ThresholdRule | None = None, grid: np.ndarray = GRID
) -> np.ndarray:
    """[n, L] probabilities and 0/1 labels -> [L] thresholds by ``rule`` (default: ``ThresholdRule()``)."""
    return explain_thresholds(probs, labels, rule, grid)["thresholds"]


def explain_thresholds(
    probs: np.ndarray, labels: np.ndarray, rule: ThresholdRule | None = None, grid: np.ndarray = GRID
) -> dict:
    """``fit_thresholds`` with its workings: [L] ``thresholds``, ``positives``, ``own`` (best-F1
    value; ties go to the higher threshold: fewer false positives on new data), ``shrunk``
    (after the prior), ``floor`` (the share cap's lowest allowed value), and ``pooled``."""
    rule = rule or ThresholdRule()
    tp, predicted, support = grid_counts(probs, labels, grid)
    f1 = 2 * tp / np.maximum(predicted + support[None, :], 1)
    own = grid[len(grid) - 1 - np.argmax(f1[::-1], axis=0)].astype(np.float64)  # last index of the max
    present = support > 0
    pooled = float(grid[len(grid) - 1 - np.argmax(f1[:, present].mean(1)[::-1])]) if present.any() else rule.fallback

    def lowest_within(ratio: float) -> np.ndarray:  # [L] lowest grid value tagging <= ratio x positives
        allowed = predicted <= ratio * support[None, :]  # [grid, L]; rows tagged fall as the grid rises
        return np.where(allowed.any(0), grid[np.argmax(allowed, axis=0)], grid[-1])

    if rule.prior not in ("pooled", "share"):
        raise ValueError(f"ThresholdRule.prior is {rule.prior!r}; use 'pooled' or 'share'")
    target = np.full(len(support), pooled) if rule.prior == "pooled" else lowest_within(1.0)
    shrunk = (support * own + rule.shrink * target) / np.maximum(support + rule.shrink, 1e-12)
    floor = np.zeros(len(support)) if rule.max_share_ratio is None else lowest_within(rule.max_share_ratio)
    thresholds = np.maximum(shrunk, floor)
    thresholds[~present] = rule.fallback
    return {
        "thresholds": thresholds.astype(np.float32),
        "positives": support,
        "own": own,
        "shrunk": shrunk,
        "floor": floor,
        "target": target,
        "pooled": pooled,
    }


def threshold_notes(explained: dict, rule: ThresholdRule | None = None) -> dict:
    """What ``metrics.json`` records of a fit: the rule, and for every label whose threshold rests
    on fewer than ``rule.min_positives`` positives (or which the cap raised), its positives, its
    own best-F1 value and the value it got, with what moved it."""
    rule = rule or ThresholdRule()
    labels = {}
    for j, name in enumerate(EMOTIONS):
        n = int(explained["positives"][j])
        final, own = float(explained["thresholds"][j]), float(explained["own"][j])
        capped = bool(explained["floor"][j] > explained["shrunk"][j]) and n > 0
        if n >= rule.min_positives and not capped:
            continue
        if n == 0:
            why = f"no positive example: fallback {rule.fallback:g}"
        else:
            why = []
            if rule.shrink and n < rule.min_positives:
                toward = (
                    f"the pooled {explained['pooled']:.2f}"
                    if rule.prior == "pooled"
                    else f"its share-matching {explained['target'][j]:.2f}"
                )
                why.append(f"shrunk toward {toward} ({n} positives against a prior of {rule.shrink:g})")
            if capped:
                why.append(f"raised so it is tagged on at most {rule.max_share_ratio:g}x its positives")
            why = "; ".join(why) or "kept its own best-F1 value"
        labels[name] = {
            "positives": n,
            "own": round(own, 4),
            "threshold": round(final, 4),
            "few_positives": n < rule.min_positives,
            "what_was_done": why,
        }
    return {"rule": rule.as_dict(), "pooled": float(explained["pooled"]), "labels": labels}


def fit_bundle_thresholds(
    probs: np.ndarray, labels: np.ndarray, rule: ThresholdRule | None = None
) -> tuple[np.ndarray, dict]:
    """A bundle's thresholds and ``threshold_notes`` on them, with a warning in the log naming
    every label whose threshold rests on fewer than ``rule.min_positives`` positives or which the
    share cap raised, and what was done about it."""
    rule = rule or ThresholdRule()
    explained = explain_thresholds(probs, labels, rule)
    notes = threshold_notes(explained, rule)
    few = {name: row for name, row in notes["labels"].items() if row["few_positives"]}
    if few:
        log.warning(
            "thresholds: %d label(s) rest on fewer than %d positives: %s",
            len(few),
            rule.min_positives,
            "; ".join(
                f"{name} ({row['positives']}): {row['own']:.2f} -> {row['threshold']:.2f}, {row['what_was_done']}"
                for name, row in few.items()
            ),
        )
    capped = [name for name, row in notes["labels"].items() if not row["few_positives"]]
    if capped:
        log.info("thresholds raised by the share cap (%gx): %s", rule.max_share_ratio, ", ".join(capped))
    return explained["thresholds"], notes


def grid_counts(
    probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = GRID
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([grid, L] true positives and [grid, L] rows predicted at each grid threshold, [L] positives)."""
    if probs.shape != labels.shape:
        raise ValueError(f"probs {probs.shape} and labels {labels.shape} differ in shape")
    positive = labels.astype(bool)
    # [grid, n, L] predictions are too big for large n; count per grid value instead.
    tp = np.stack([((probs >= t) & positive).sum(0) for t in grid])  # [grid, L]
    predicted = np.stack([(probs >= t).sum(0) for t in grid])  # [grid, L]
    return tp, predicted, positive.sum(0)


def f1_curves(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = GRID) -> tuple[np.ndarray, np.ndarray]:
    """([grid, L] each label's F1 at each grid threshold, [L] positives per label)."""
    tp, predicted, support = grid_counts(probs, labels, grid)
    return 2 * tp / np.maximum(predicted + support[None, :], 1), support


def label_shares(labels: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    """How often each label is tagged against how often it is true, for [n, L] 0/1 ``labels`` and
    ``predicted``: [L] ``positives``, ``tagged`` (counts), ``true_share``, ``predicted_share``
    (fractions of rows) and ``ratio`` (predicted over true share; nan where the label is never
    true)."""
    labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
    n = max(len(labels), 1)
    positives, tagged = labels.sum(0), predicted.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(positives > 0, tagged / np.maximum(positives, 1), np.nan)
    return {
        "positives": positives,
        "tagged": tagged,
        "true_share": positives / n,
        "predicted_share": tagged / n,
        "ratio": ratio,
    }


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
            "true_share": float(s[i]) / max(len(y_true), 1),
            "predicted_share": float(y_pred[:, i].sum()) / max(len(y_true), 1),
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
    labels: np.ndarray, probs: np.ndarray, *, rule: ThresholdRule | None = None, seed: int = HELDOUT_SEED
) -> dict | None:
    """The held-out estimate: thresholds fitted on one half of these rows, the metrics scored on
    the other, both ways, averaged (``SUMMARY`` keys), with each fold's thresholds' source rows
    never among its scored rows. ``labels_absent``: labels absent from either scored half.
    ``shares``: per label, how often it is tagged (each row at the thresholds of the half it was
    not in) against how often it is true; ``largest_share_ratio``: the worst of them among labels
    with ``SHARE_JUDGED`` or more positives. None for a set too small to halve."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    _check_inputs(labels, probs, 0.5)
    halves = _folds(labels, seed)
    if not all(len(half) for half in halves[0]):
        return None
    folds, predicted = [], np.zeros(labels.shape, dtype=bool)
    for fit, scored in halves:
        thresholds = fit_thresholds(probs[fit], labels[fit], rule)
        folds.append(compute_metrics(labels[scored], probs[scored], thresholds))
        predicted[scored] = probs[scored] >= thresholds
    out = {key: float(np.mean([fold[key] for fold in folds])) for key in SUMMARY}
    out["labels_absent"] = sorted({name for fold in folds for name in fold["labels_absent"]}, key=EMOTIONS.index)
    out.update(seed=seed, examples=int(len(labels)))
    out["shares"] = share_table(labels, predicted)
    out["largest_share_ratio"] = largest_share_ratio(out["shares"])
    return out


def share_table(labels: np.ndarray, predicted: np.ndarray) -> dict[str, dict]:
    """``label_shares`` as ``{label: {positives, tagged, true_share, predicted_share, ratio}}``
    (ratio None where the label is never true), in ``EMOTIONS`` order."""
    shares = label_shares(labels, predicted)
    return {
        name: {
            "positives": int(shares["positives"][j]),
            "tagged": int(shares["tagged"][j]),
            "true_share": float(shares["true_share"][j]),
            "predicted_share": float(shares["predicted_share"][j]),
            "ratio": None if np.isnan(shares["ratio"][j]) else float(shares["ratio"][j]),
        }
        for j, name in enumerate(EMOTIONS)
    }


def largest_share_ratio(table: dict[str, dict], judged: int = SHARE_JUDGED) -> dict | None:
    """The label tagged most often against its true share, among those with ``judged`` or more
    positives: ``{"label", "ratio", "predicted_share", "true_share", "positives"}``; None if none qualifies."""
    ratios = {name: row for name, row in table.items() if row["positives"] >= judged and row["ratio"] is not None}
    if not ratios:
        return None
    name = max(ratios, key=lambda label: ratios[label]["ratio"])
    row = ratios[name]
    keys = ("ratio", "predicted_share", "true_share", "positives")
    return {"label": name, **{key: row[key] for key in keys}}


def heldout_macro_f1(
    labels: np.ndarray, probs: np.ndarray, *, rule: ThresholdRule | None = None, seed: int = HELDOUT_SEED
) -> float:
    """``heldout_metrics``' macro-F1 alone (nan for a set too small to halve): what epochs, trials
    and the choice of a stage's head compare."""
    metrics = heldout_metrics(labels, probs, rule=rule, seed=seed)
    return float("nan") if metrics is None else metrics["macro_f1"]


def validation_scores(labels: np.ndarray, probs: np.ndarray, *, rule: ThresholdRule | None = None) -> dict[str, float]:
    """What every epoch reports, in training and in the head sweep: the validation loss, macro-F1
    three ways, and the largest held-out ratio of tagged to true share. ``val_macro_f1_heldout``
    (thresholds fitted on one half, scored on the other) is what runs are compared by; the one at
    0.5 needs no thresholds; the in-sample one (thresholds fitted on the rows scored) flatters and
    chooses nothing."""
    eps = 1e-7
    loss = float(-np.mean(labels * np.log(probs + eps) + (1 - labels) * np.log(1 - probs + eps)))
    in_sample = compute_metrics(labels, probs, fit_thresholds(probs, labels, rule))
    held = heldout_metrics(labels, probs, rule=rule)
    largest = (held or {}).get("largest_share_ratio") or {}
    return {
        "val_loss": loss,
        "val_macro_f1_heldout": float("nan") if held is None else held["macro_f1"],
        "val_macro_f1": compute_metrics(labels, probs, 0.5)["macro_f1"],
        "val_macro_f1_in_sample": in_sample["macro_f1"],
        # the label tagged most often against its true share, held out (labels with 10+ positives)
        "val_share_ratio_max": float(largest.get("ratio", float("nan"))),
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
    rule: ThresholdRule | None = None,
) -> dict:
    """Held-out macro-F1 of ``candidate`` probabilities minus ``reference``'s on the same rows, at
    thresholds fitted on ``reference`` (as a bundle's are) on the other half, both ways, averaged;
    with a 95% paired bootstrap interval (rows resampled within each scored half, the same rows
    for both sides) and the share of rows whose label set changes at thresholds fitted on all rows."""
    labels = np.asarray(labels).astype(bool)
    rng = np.random.default_rng(seed)
    point, spread = {"reference": 0.0, "candidate": 0.0}, np.zeros(resamples)
    tagged = {"reference": np.zeros(labels.shape[1]), "candidate": np.zeros(labels.shape[1])}  # held out
    for fit, scored in _folds(labels, seed):
        thresholds = fit_thresholds(reference[fit], labels[fit], rule)
        y, a, b = labels[scored], reference[scored] >= thresholds, candidate[scored] >= thresholds
        point["reference"] += float(macro_f1(y, a)[0]) / 2
        point["candidate"] += float(macro_f1(y, b)[0]) / 2
        tagged["reference"] += a.sum(axis=0)
        tagged["candidate"] += b.sum(axis=0)
        counts = rng.multinomial(len(scored), np.full(len(scored), 1 / len(scored)), size=resamples)
        spread += (macro_f1(y, b, counts) - macro_f1(y, a, counts)) / 2
    thresholds = fit_thresholds(reference, labels, rule)
    changed = ((reference >= thresholds) != (candidate >= thresholds)).any(axis=1).mean()
    low, high = np.percentile(spread, [2.5, 97.5])
    # How much more often the candidate tags a label than the reference does, held out, among labels
    # with SHARE_JUDGED or more positives: a runtime can keep macro-F1 and still over-tag a label.
    judged = np.flatnonzero(labels.sum(axis=0) >= SHARE_JUDGED)
    ratios = tagged["candidate"][judged] / np.maximum(tagged["reference"][judged], 1)
    worst = int(judged[np.argmax(ratios)]) if len(judged) else None
    return {
        "share_change": None
        if worst is None
        else {
            "label": EMOTIONS[worst],
            "ratio": float(ratios.max()),
            "reference_share": float(tagged["reference"][worst] / len(labels)),
            "candidate_share": float(tagged["candidate"][worst] / len(labels)),
        },
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
    rule: ThresholdRule | None = None,
) -> dict:
    """The held-out estimate first, then the metrics at 0.5 and at ``thresholds``; ``in_sample``:
    whether ``thresholds`` were fitted on these very rows (then ``at_thresholds`` flatters, and
    says so), or elsewhere (then it is the true test)."""
    at_thresholds = compute_metrics(labels, probs, thresholds)
    if not in_sample:  # the bundle's own thresholds on data they never saw: the shares a user will get
        th = _check_inputs(labels, probs, thresholds)
        at_thresholds["shares"] = share_table(labels, np.asarray(probs) >= th[None, :])
        at_thresholds["largest_share_ratio"] = largest_share_ratio(at_thresholds["shares"])
    return {
        "source": source,
        "model": model,
        "n_examples": int(np.asarray(labels).shape[0]),
        "labels_absent": at_thresholds["labels_absent"],
        "heldout": heldout_metrics(labels, probs, rule=rule),
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
    precision: str = "fp32",
) -> dict:
    """Predict ``data`` with the bundle at ``model`` on runtime ``precision`` (``precision.RUNTIMES``:
    fp32, bf16, int8, onnx-fp32, onnx-int8); optionally write metrics.json, report.md and
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
    probs = bundle.predict_proba(labelled.texts, batch_size=batch_size, precision=precision)
    fitted_on = thresholds_source(bundle.config)
    report = evaluation_report(
        labelled.labels,
        probs,
        bundle.thresholds,
        in_sample=data == fitted_on,
        source=labelled.source,
        model=f"{bundle.path} ({bundle.hash})",
        rule=rule_of(bundle.config),
    )
    report["thresholds_fitted_on"] = fitted_on
    # The outputs they were fitted on (torch fp32, IEEE matmuls); "unknown": a bundle made before it was recorded.
    report["thresholds_precision"] = bundle.thresholds_precision or "unknown"
    report["precision"] = precision
    if report_dir is not None:
        write_evaluation_report(report, report_dir, title=f"Evaluation of {str(model).rstrip('/').rsplit('/', 1)[-1]}")
    log.info("\n%s", format_summary(report))
    return report


def thresholds_source(config: dict) -> str:
    """The data a bundle's thresholds were fitted on (its training config's threshold split)."""
    data = config.get("data", {})
    return data.get(config.get("thresholds", {}).get("split", "validation"), "")
