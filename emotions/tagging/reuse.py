"""What a committed output saves a run: nothing to do when it is committed with the same
settings and inputs (``check_committed``), and the files of unchanged inputs it keeps as they are
(``reusable``, the nightly re-open). Both compare the manifest's inputs with the inputs now:
URI, rows, bytes, fingerprint and mtime.

    committed manifest + settings key + inputs -> check_committed -> its TagSummary (nothing to do)
                                                                   | None (tag) | TaggingError
                                              -> reusable -> {output name: marker of a kept file}
"""

from __future__ import annotations

import logging

from emotions.storage import Folder
from emotions.tagging.commit import MANIFEST, Committed, staged_rows
from emotions.tagging.inputs import InputFile
from emotions.tagging.settings import TaggingError
from emotions.tagging.summary import TagSummary

log = logging.getLogger("emotions.tagging")


def check_committed(
    target: Folder,
    previous: Committed | None,
    key: str,
    files: list[InputFile],
    bad: list[tuple[str, str]],
    overwrite: bool,
    force: bool = False,
) -> TagSummary | None:
    """A committed output with these settings and inputs -> its summary (nothing to do), unless
    ``force``. One with other settings or inputs is refused unless ``overwrite``. -> None: tag."""
    if previous is None or force:
        return None
    entries = previous.manifest.get("inputs", [])
    before = {(i["path"], i["rows"], i["bytes"], i.get("fingerprint"), i.get("mtime_ns")) for i in entries}
    now = {f.identity for f in files}
    skipped_before = {s["path"] for s in previous.manifest.get("skipped_files", [])}
    same = previous.key == key and before == now and skipped_before == {uri for uri, _ in bad}
    kept = reusable(target, previous, key, files) if same else {}
    if same and len(kept) < len(files) and not overwrite:
        broken = sorted({f.output_name for f in files} - set(kept))
        raise TaggingError(
            f"output {target.uri} is committed with these settings and inputs, but its files "
            f"{broken[:5]} are missing or do not hold their rows; pass --overwrite to tag "
            "the inputs again"
        )
    if same and len(kept) == len(files):
        m = previous.manifest
        log.info("%s is already committed with these settings and inputs; nothing to do", target.uri)
        return TagSummary(
            rows_in=m["rows_in"],
            rows_out=m["rows_out"],
            rows_flagged=m["rows_flagged"],
            seconds=0.0,
            rows_per_s=0.0,
            output=target.uri,
            manifest=target.uri_of(MANIFEST),
            files=len(files),
            files_skipped=tuple(uri for uri, _ in bad),
            unchanged=True,
        )
    if overwrite:
        return None
    if previous.key != key:
        why = "with other settings or another model"
    else:
        paths_before, paths_now = {i[0] for i in before}, {f.uri for f in files}
        changed = len({i[0] for i in before - now} & paths_now)
        why = (
            f"from other inputs ({len(paths_now - paths_before)} new, {changed} changed, "
            f"{len(paths_before - paths_now)} removed)"
        )
    raise TaggingError(
        f"output {target.uri} already holds a committed tagging output made {why}; pass "
        "--overwrite (overwrite=True) to replace it, or choose another output folder"
    )


def reusable(target: Folder, previous: Committed | None, key: str, files: list[InputFile]) -> dict[str, dict]:
    """Output files of ``previous`` that this run keeps as they are: same settings key, same input
    (URI, rows, bytes), and a footer that holds its rows. -> {output name: its marker}."""
    if previous is None or previous.key != key:
        return {}
    entries = {i["output"]: i for i in previous.manifest.get("inputs", [])}
    kept = {}
    for f in files:
        entry = entries.get(f.output_name)
        if (
            entry
            and (entry["path"], entry["rows"], entry["bytes"], entry.get("fingerprint"), entry.get("mtime_ns"))
            == f.identity
            and staged_rows(target, f.output_name) == f.rows
        ):
            kept[f.output_name] = {
                "output": f.output_name,
                "rows_out": entry["rows_out"],
                "flagged": entry["flagged"],
                "reasons": entry.get("reasons", {}),
                "written_by": entry.get("written_by"),
                "reused": True,
            }
    return kept
