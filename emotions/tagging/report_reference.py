"""The report's reference: each label's share in the validation data of the bundle that tagged the run.

    bundle metrics.json --validation_reference (at tag time)--> _manifest.json["reference"]
    _manifest.json --read_reference (at report time)--> the reference, or None

A share of tagged rows means little alone: "relief on 15% of comments" is alarming only beside
relief being true on 0.2% of validation comments. The reference gives, per label, how often it is
true in the bundle's validation rows (``true_share``) and how often the bundle tagged it there
(``predicted_share``), each row at thresholds fitted on the other half of the rows (held out).
Bundles trained before ``heldout.shares`` was recorded give the true share only, from the
per-label ``support`` over ``n_examples``; their ``predicted_share`` is None.

Recorded at tag time. ``tag_corpus`` already loads and verifies the bundle, so it copies the
reference (three numbers per label) into the run's manifest. The report then reads only the output
folder, which it reads anyway: it needs no access to the bundle (a nightly report on another
machine, a report rewritten months later after the bundle was replaced or deleted), and the
reference is that of the very bundle whose hash tagged the rows, not of whatever is at its path
now. Outputs committed before the reference was recorded fall back to the bundle's metrics.json at
the manifest's model path, used only if that bundle's manifest still gives the hash that tagged the
run; a bundle that cannot be read is a logged warning and a report without the reference.
"""

from __future__ import annotations

import logging
import math

from emotions.labels import EMOTIONS
from emotions.storage import Folder

log = logging.getLogger("emotions.report")

HELDOUT = "heldout.shares"  # the reference's "source": shares recorded by training, held out
SUPPORT = "at_thresholds.support"  # older bundles: true shares from per-label support / n_examples


def validation_reference(metrics: dict) -> dict | None:
    """A bundle's metrics.json -> ``{"source", "examples", "labels": {label: {"true_share",
    "predicted_share", "positives"}}}`` in ``EMOTIONS`` order (``predicted_share`` None when the
    bundle did not record it); None when the metrics give no share for every label."""
    heldout = metrics.get("heldout") or {}
    shares = {label: (heldout.get("shares") or {}).get(label) or {} for label in EMOTIONS}
    if all(_is_share(row.get("true_share")) for row in shares.values()):
        labels = {
            label: {
                "true_share": float(row["true_share"]),
                "predicted_share": _share_or_none(row.get("predicted_share")),
                "positives": row.get("positives"),
            }
            for label, row in shares.items()
        }
        return {"source": HELDOUT, "examples": heldout.get("examples", metrics.get("n_examples")), "labels": labels}
    examples = metrics.get("n_examples")
    per_label = (metrics.get("at_thresholds") or {}).get("per_label") or {}
    support = {label: (per_label.get(label) or {}).get("support") for label in EMOTIONS}
    if not (isinstance(examples, int) and examples > 0 and all(isinstance(n, int) for n in support.values())):
        return None
    labels = {
        label: {"true_share": n / examples, "predicted_share": None, "positives": n} for label, n in support.items()
    }
    return {"source": SUPPORT, "examples": examples, "labels": labels}


def read_reference(manifest: dict) -> dict | None:
    """The reference of a committed run: recorded in its manifest, else (an output committed before
    it was recorded) read from the metrics.json of the bundle that tagged it; None, with a warning,
    when that bundle cannot be read or is no longer at its path."""
    if "reference" in manifest:
        return manifest["reference"]
    model = manifest.get("model") or {}
    if not model.get("path"):
        return None
    metrics, problem = read_bundle_metrics(model["path"], model.get("hash"))
    reference = validation_reference(metrics) if metrics is not None else None
    if reference is None:
        problem = problem or "its metrics.json gives no validation shares"
        log.warning("no validation reference in the report: the bundle %s %s", model["path"], problem)
    return reference


def read_bundle_metrics(path: str, tagged_by: str | None) -> tuple[dict | None, str | None]:
    """(metrics.json of the bundle at ``path``, None) if it is still the bundle whose content hash
    ``tagged_by`` tagged the run (as its manifest.json says), else (None, what is wrong)."""
    try:
        bundle = Folder.from_uri(path)
        manifest = bundle.read_json("manifest.json")
        if manifest is None:
            return None, "cannot be read: it has no manifest.json (deleted or moved?)"
        if manifest.get("hash") != tagged_by:
            return None, f"is no longer the one that tagged this run (hash {manifest.get('hash')}, not {tagged_by})"
        return bundle.read_json("metrics.json"), None
    except (OSError, ValueError) as error:  # unreachable, no credentials; StorageError is a ValueError
        return None, f"cannot be read ({error})"


def _is_share(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1


def _share_or_none(value) -> float | None:
    return float(value) if _is_share(value) else None
