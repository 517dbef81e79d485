"""The output's lease: one run writes an output folder at a time (``writing``), a run checks it
still holds the lease before it commits (``check_lease``), and a committed run's leftover staging
folder is removed under it (``remove_leftover_staging``).

    OUTPUT/_lease/output.<generation or owner>.json    the holder's claim (emotions.leases),
                                                       renewed while ``with writing(target)`` runs
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from emotions.storage import Folder
from emotions.tagging.commit import LEASE, STAGING, SUCCESS
from emotions.tagging.settings import OutputBusy, TaggingError

OUTPUT_LEASE_TTL_S = 300.0  # a run killed on another host blocks its output this long at most


@contextmanager
def writing(target: Folder):
    """Hold the output's lease while the block runs: one run writes an output at a time. A lease
    whose holder was a process on this host that is gone (a killed run, re-run on the same
    machine or head pod) is taken over at once; one from elsewhere when it expires."""
    from emotions.leases import Lease, new_owner

    lease = Lease(target.child(LEASE), "output", new_owner(), ttl_s=OUTPUT_LEASE_TTL_S)
    if not lease.acquire():
        holder = lease.holder.owner if lease.holder else "unknown"
        until = (
            f", its lease runs until {time.strftime('%H:%M:%S', time.localtime(lease.holder.expires))}"
            if lease.holder
            else ""
        )
        raise OutputBusy(
            f"output {target.uri} is being written by another run ({holder}{until}); wait for it "
            "to finish, or choose another output folder",
            holder,
        )
    with lease.held():
        yield lease


def remove_leftover_staging(target: Folder) -> None:
    """The staging folder of the run that committed the output, left by a run killed after its
    ``_SUCCESS``: removed under the output's lease (left for later if another run holds it)."""
    committed = target.read_json(SUCCESS) or {}
    run = target.read_json(STAGING, "run.json") or {}
    if not target.exists(STAGING) or run.get("run_id") != committed.get("run_id"):
        return
    try:
        with writing(target):
            if (target.read_json(STAGING, "run.json") or {}).get("run_id") == committed.get("run_id"):
                target.delete(STAGING)
    except TaggingError:  # another run writes here now; Staging.open discards it
        pass


def check_lease(lease, target: Folder) -> None:
    """Raise unless this run still holds the output's lease (claims read again, not only the
    heartbeat's word): a run that stalled past the lease's expiry must not commit."""
    if lease.lost.is_set() or not lease.renew():
        raise TaggingError(
            f"not committing {target.uri}: this run lost its lease on the output to another "
            "run while tagging (it stalled past the lease's expiry); the other run finishes it"
        )
