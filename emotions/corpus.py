"""Synthetic Reddit-style comment dumps in Parquet, for the tagging quickstart, tests and benchmarks.

Texts are real GoEmotions comments (the bundled train split) mixed with the junk that real dumps
carry: ``[deleted]``/``[removed]`` placeholders, empty, null and whitespace-only bodies, bare URLs,
emoji-only comments and very long texts (thousands of characters). Files deliberately disagree on
schema the way dumps from different exporters do: some store ``body`` as ``large_string``, one has
an extra column.

    id string | body string or large_string | author string | subreddit string
    created_utc int64 | score int64 | (one file) controversiality int64
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emotions.data import load_labelled

FILE_PATTERN = "comments-{:05d}.parquet"
ROW_GROUP_ROWS = 10_000  # several row groups per big file, as exporters write them
START_UTC = 1_700_000_000  # 2023-11-14, seconds
SUBREDDITS = (
    "AskReddit",
    "movies",
    "gaming",
    "worldnews",
    "aww",
    "soccer",
    "personalfinance",
    "books",
    "Cooking",
    "relationship_advice",
    "technology",
    "nba",
)
URLS = (
    "https://www.reddit.com/r/AskReddit/comments/7x1a2b/",
    "http://imgur.com/a/Xk3pQ",
    "https://en.wikipedia.org/wiki/Emotion",
    "https://youtu.be/dQw4w9WgXcQ",
)
EMOJI = ("😂", "❤️", "🔥", "😭", "👍", "🙄", "😡", "🎉", "🤔", "😱")
# Junk kinds and their share of the junk rows. Only null/empty/whitespace/placeholders are
# flagged by the tagger; URLs, emoji and long texts are real text and get tagged.
JUNK = {
    "deleted": 0.25,
    "removed": 0.15,
    "empty": 0.1,
    "null": 0.1,
    "whitespace": 0.05,
    "url": 0.1,
    "emoji": 0.1,
    "long": 0.15,
}


def make_corpus(out_dir: str | Path, rows: int, files: int, seed: int = 0, junk_fraction: float = 0.05) -> list[Path]:
    """Write ``rows`` comments across ``files`` Parquet files in ``out_dir``; return their paths.

    Earlier files of this generator in ``out_dir`` are replaced. File 1 of every 3 stores
    ``body`` as large_string, and file 2 (when there are 3 or more) carries an extra column."""
    if rows < 0 or files < 1 or not 0.0 <= junk_fraction <= 1.0:
        raise ValueError(
            f"make_corpus needs rows >= 0, files >= 1 and junk_fraction in [0, 1]; "
            f"got rows={rows}, files={files}, junk_fraction={junk_fraction}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(FILE_PATTERN.replace("{:05d}", "*")):
        old.unlink()
    rng = np.random.default_rng(seed)
    comments = load_labelled("goemotions:train").texts
    bodies = [_body(rng, comments, junk_fraction) for _ in range(rows)]
    first_id = int(rng.integers(36**6, 36**7 - rows))  # 7-character base-36 ids, like Reddit's
    table = pa.table(
        {
            "id": [_base36(first_id + i) for i in range(rows)],
            "body": pa.array(bodies, pa.string()),
            "author": [
                ("[deleted]" if body in ("[deleted]", "[removed]") else f"user_{k}")
                for body, k in zip(bodies, rng.integers(0, max(rows // 5, 1), rows))
            ],
            "subreddit": pa.array(rng.choice(SUBREDDITS, rows).tolist(), pa.string()),
            "created_utc": np.sort(START_UTC + rng.integers(0, 86_400, rows)).astype(np.int64),
            "score": np.round(rng.pareto(1.5, rows) * 3 - rng.integers(0, 3, rows)).astype(np.int64),
        }
    )
    bounds = np.linspace(0, rows, files + 1).astype(int)
    paths = []
    for k in range(files):
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        if k % 3 == 1:
            part = part.set_column(1, "body", part.column("body").cast(pa.large_string()))
        if k == 2:
            part = part.append_column("controversiality", pa.array(rng.integers(0, 2, part.num_rows)))
        path = out / FILE_PATTERN.format(k)
        pq.write_table(part, path, row_group_size=ROW_GROUP_ROWS)
        paths.append(path)
    return paths


def sample_corpus(out_dir: str | Path, rows: int = 2000, files: int = 4, seed: int = 0) -> list[Path]:
    """The quickstart's corpus: 2,000 comments in 4 files, 5% junk, mixed schemas."""
    return make_corpus(out_dir, rows, files, seed)


def _body(rng: np.random.Generator, comments: list[str], junk_fraction: float) -> str | None:
    if rng.random() >= junk_fraction:
        text = comments[rng.integers(len(comments))]
        if rng.random() < 0.03:  # real comments often carry a link or an emoji
            extra = URLS[rng.integers(len(URLS))] if rng.random() < 0.5 else EMOJI[rng.integers(len(EMOJI))]
            text += " " + extra
        return text
    kind = rng.choice(list(JUNK), p=list(JUNK.values()))
    if kind in ("deleted", "removed"):
        return f"[{kind}]"
    if kind == "empty":
        return ""
    if kind == "null":
        return None
    if kind == "whitespace":
        return rng.choice([" ", "\n", "\t \n", "   "])
    if kind == "url":
        return URLS[rng.integers(len(URLS))]
    if kind == "emoji":
        return "".join(rng.choice(EMOJI, rng.integers(1, 6)))
    target = int(rng.integers(2000, 8000))  # a rant or a pasted article: thousands of characters
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < target:
        parts.append(comments[rng.integers(len(comments))])
    return " ".join(parts)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"
