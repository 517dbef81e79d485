"""A test hook: make the process that reaches a named step of a tagging run die there.

    EMOTIONS_CRASH_FILE=/tmp/x/crash    set before Ray starts, so every Ray worker inherits it
    echo merge-written > /tmp/x/crash   arm it: the next process to reach that step dies

``crash_point(step)`` is called at every step where a process can die (``STEPS``). Unless
``EMOTIONS_CRASH_FILE`` is set it costs one environment lookup. When the file names ``step``,
the first process to reach the step takes the file away (a rename: only one process can) and
exits at once with ``CRASH_EXIT``, skipping every ``finally`` and ``atexit``, the way a killed
process or a lost node ends. Users never set it; ``tests/test_crashes.py`` does.
"""

from __future__ import annotations

import os

CRASH_FILE = "EMOTIONS_CRASH_FILE"
CRASH_EXIT = 86

# Where a process of a tagging run can die, in the order a run reaches them: (step, the process).
STEPS = (
    ("part-written", "Tagger actor: a part file written, not yet reported (Ray retries the batch)"),
    ("part-reported", "driver: parts reported, merges not all submitted"),
    ("merge-writing", "merge task: the output file half written (Ray retries the task)"),
    ("merge-written", "merge task: the output file written, no marker yet (Ray retries the task)"),
    ("marker-written", "merge task: the marker written, parts not deleted (Ray retries the task)"),
    ("parts-deleted", "merge task: parts deleted, result not returned (Ray retries the task)"),
    ("commit-begun", "driver: every file staged and checked, _COMMITTING written"),
    ("success-removed", "driver: the previous output's _SUCCESS removed"),
    ("file-moved", "driver: the first staged file moved into the output"),
    ("files-moved", "driver: every staged file moved, the previous output's other files not deleted"),
    ("old-deleted", "driver: the first of the previous output's files deleted"),
    ("manifest-written", "driver: _manifest.json written, no _SUCCESS"),
    ("success-written", "driver: _SUCCESS written, the staging folder not removed"),
    ("staging-removed", "driver: the staging folder removed, the output lease not released"),
)


def crash_point(step: str) -> None:
    """Die here if the crash file names ``step`` (see the module docstring)."""
    path = os.environ.get(CRASH_FILE)
    if not path:
        return
    try:
        with open(path) as f:
            armed = f.read().strip()
    except OSError:
        return
    if armed != step:
        return
    try:
        os.rename(path, f"{path}.fired")  # only one process takes it
    except OSError:
        return
    os._exit(CRASH_EXIT)
