"""What a tagging report counts, and how it calls out drift (see emotions.tagging.report).

    committed output's *.parquet ──Ray Data: count_block per block──▶ (kind, key, value) rows
        ──summed on the driver──▶ Counts ──label_drift / psi against pooled baselines──▶ drift

Counting. One Ray Data pass over the output's Parquet files, reading only the five columns it
needs: ``count_block`` turns each block into a few dozen (kind, key, value) rows with
vectorised pyarrow/numpy (label counts, group counts, reasons, a 20-bin histogram), and the
driver sums those as they stream in. The driver never holds tagged rows, only about a hundred
numbers per block, so the pass scales with the corpus like the tagging does; a groupby in Ray
Data would shuffle those few rows between tasks for nothing.

Drift per label. A label is called out when its share of tagged rows changed by a factor of at
least ``SHARE_RATIO`` either way *and* by at least ``MIN_Z`` standard errors (see the constants
for why both). ``top_score``'s distribution is compared with the population stability index
(PSI) over ten bins, the setting that index's usual thresholds were made for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from emotions import cluster
from emotions.labels import EKMAN, EMOTIONS, SENTIMENT
from emotions.storage import Folder

COLUMNS = ["emotions", "ekman", "sentiment", "top_score", "error"]  # what the counts read
NONE = "(none)"  # key for tagged rows with no label (no Ekman group, no sentiment)
SCORE_BINS = 20  # top_score histogram over [0, 1], 0.05 wide
READ_CPUS = 0.25  # per read-and-count task: decoding five columns and counting is light
# A label is called out when both hold:
# - its share of tagged rows went up by at least half, or down by at least a third (ratio 1.5
#   either way). An effect size, not a divergence: the PSI or Jensen-Shannon distance of a
#   label's present/absent split shrinks with the label's share, so their usual thresholds
#   (PSI > 0.2, JS distance > 0.1) miss a tripled share unless the label is common: PSI 0.12 for
#   5% -> 15% and 0.02 for 1% -> 3%; JS distance 0.06 for 1% -> 3% and 0.03 for grief's
#   0.2% -> 0.6%. A ratio treats grief (0.2% of GoEmotions) like neutral (33%).
# - the change is at least 4 standard errors of the two-proportion z-test: sampling noise alone
#   crosses that with probability 6e-5 per label, so about once in 1.5 years of nightly reports
#   over 28 labels. On a small corpus this keeps a rare label's noisy ratio from being called
#   out; on millions of rows the ratio is what decides.
SHARE_RATIO = 1.5
MIN_Z = 4.0
# top_score: PSI over ten 0.1-wide bins, called out above 0.25, the usual "significant shift" rule
# (< 0.1 stable, 0.1-0.25 moderate). Sampling noise adds about (bins - 1) * (1/n + 1/m) to it,
# under 0.01 for runs of a few thousand rows or more.
PSI_BINS = 10
PSI_LIMIT = 0.25


@dataclass
class Counts:
    """What a report needs from a committed run, as sums (so runs can be pooled)."""

    rows: int = 0
    tagged: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # flag reason -> rows
    emotions: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*EMOTIONS, NONE], 0))
    ekman: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*EKMAN, NONE], 0))
    sentiment: dict[str, int] = field(default_factory=lambda: dict.fromkeys([*SENTIMENT, NONE], 0))
    top_score_bins: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)
    top_score_sum: float = 0.0

    @property
    def flagged(self) -> int:
        return self.rows - self.tagged

    def add(self, other: Counts) -> Counts:
        """The pooled counts of both runs (a new object)."""
        out = Counts(self.rows + other.rows, self.tagged + other.tagged)
        for name in ("reasons", "emotions", "ekman", "sentiment"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(out, name, {k: mine.get(k, 0) + theirs.get(k, 0) for k in {**mine, **theirs}})
        out.top_score_bins = [a + b for a, b in zip(self.top_score_bins, other.top_score_bins)]
        out.top_score_sum = self.top_score_sum + other.top_score_sum
        return out

    @classmethod
    def from_totals(cls, totals: dict[tuple[str, str], float]) -> Counts:
        """{(kind, key): value} summed over the blocks -> Counts."""
        out = cls(
            rows=int(totals.get(("rows", ""), 0)),
            tagged=int(totals.get(("tagged", ""), 0)),
            top_score_sum=float(totals.get(("top_score_sum", ""), 0.0)),
        )
        for (kind, key), value in totals.items():
            if kind in ("reasons", "emotions", "ekman", "sentiment"):
                getattr(out, kind)[key] = int(value)
            elif kind == "top_score_bin":
                out.top_score_bins[int(key)] = int(value)
        return out


def count_block(block: pa.Table) -> pa.Table:
    """One block of tagged rows -> its counts as rows ``kind | key | value`` (float64): rows,
    tagged, flag reasons, each label, Ekman group and sentiment (``NONE``: tagged rows whose list
    is empty), the top_score histogram and sum. Flagged rows have null lists and a null score,
    so they count only as rows and by reason."""
    rows = [("rows", "", block.num_rows), ("tagged", "", pc.sum(pc.is_null(block["error"])).as_py() or 0)]
    rows += _value_counts("reasons", pc.drop_null(block["error"]))
    for kind in ("emotions", "ekman", "sentiment"):
        rows += _value_counts(kind, pc.list_flatten(block[kind]))
        rows.append((kind, NONE, pc.sum(pc.equal(pc.list_value_length(block[kind]), 0)).as_py() or 0))
    scores = pc.drop_null(block["top_score"]).to_numpy().astype(np.float64)  # [tagged rows]
    histogram, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=SCORE_BINS, range=(0.0, 1.0))
    rows += [("top_score_bin", str(i), n) for i, n in enumerate(histogram.tolist())]
    rows.append(("top_score_sum", "", float(scores.sum())))
    kinds, keys, values = zip(*rows)
    return pa.table(
        {
            "kind": pa.array(kinds, pa.string()),
            "key": pa.array(keys, pa.string()),
            "value": pa.array(values, pa.float64()),
        }
    )


def _value_counts(kind: str, values: pa.ChunkedArray | pa.Array) -> list[tuple[str, str, int]]:
    counted = pc.value_counts(values)
    return [(kind, key, n) for key, n in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())]


def count_run(folder: Folder, files: list[str], ray_address: str | None = None) -> Counts:
    """The counts of a committed output folder's Parquet ``files``: one Ray Data pass, on the
    cluster at ``ray_address`` (joined only here, so a report whose counts are stored starts no Ray)."""
    import ray

    if not files:
        return Counts()
    cluster.connect(ray_address)
    blocks = (
        ray.data.read_parquet(files, filesystem=folder.fs, num_cpus=READ_CPUS)
        .select_columns(COLUMNS)
        .map_batches(count_block, batch_format="pyarrow", batch_size=None, num_cpus=READ_CPUS)
    )
    totals: dict[tuple[str, str], float] = {}
    for batch in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
        for kind, key, value in zip(*(batch[name].to_pylist() for name in ("kind", "key", "value"))):
            totals[kind, key] = totals.get((kind, key), 0.0) + value
    return Counts.from_totals(totals)


@dataclass(frozen=True)
class LabelDrift:
    label: str
    share: float  # of this run's tagged rows
    baseline_share: float  # of the pooled baselines' tagged rows
    ratio: float  # share / baseline_share, each with half a row added (no division by zero)
    z: float  # two-proportion z statistic, pooled standard error
    called_out: bool


def label_drift(current: Counts, baseline: Counts) -> list[LabelDrift]:
    """One row per label (``EMOTIONS`` order): shares, ratio, z, and whether it is called out."""
    n, m = current.tagged, baseline.tagged
    out = []
    for label in EMOTIONS:
        x, y = current.emotions.get(label, 0), baseline.emotions.get(label, 0)
        ratio = ((x + 0.5) / (n + 1)) / ((y + 0.5) / (m + 1))
        pooled = (x + y) / max(n + m, 1)
        se = math.sqrt(pooled * (1 - pooled) * (1 / max(n, 1) + 1 / max(m, 1)))
        z = (x / max(n, 1) - y / max(m, 1)) / se if se > 0 else 0.0
        called = abs(math.log(ratio)) >= math.log(SHARE_RATIO) and abs(z) >= MIN_Z
        out.append(LabelDrift(label, x / max(n, 1), y / max(m, 1), ratio, z, called))
    return out


def psi(current: list[int], baseline: list[int], bins: int = PSI_BINS) -> float:
    """Population stability index of two histograms over the same range, merged to ``bins`` bins:
    sum((p - q) * ln(p / q)); empty bins get half a count so that the log stays finite."""
    p = np.asarray(current, dtype=np.float64).reshape(bins, -1).sum(axis=1) + 0.5
    q = np.asarray(baseline, dtype=np.float64).reshape(bins, -1).sum(axis=1) + 0.5
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))
