"""Leases on a folder of any storage: one holder at a time, for dates (``nightly``) and outputs.

    lease = Lease(Folder.from_uri("s3://b/tagged/_leases"), "2026-11-25", owner)
    if lease.acquire():      # False: lease.holder names the run that holds it
        with lease.held():   # renewed every ttl / 3 until the block ends, then released
            ...              # lease.lost is set if the heartbeat finds it was taken over

A claim is a small JSON object (owner, expiry by the owner's clock) in the folder. A run that
dies stops renewing, and its claim is taken over once it has expired; a claim whose owner was a
process on this same host that is gone (``owner_is_dead_here``: a killed run re-run on the same
machine or head pod) counts as expired at once. Expiry compares the owner's clock with the
reader's, so clocks must agree to well within the TTL.

Two protocols, picked per folder by what the storage offers (``Lease.protocol``):

``create-if-absent`` (local disks, S3, GCS when google-cloud-storage is installed). Claims are
generations ``<name>.<generation:010d>.json``; the highest generation is the holder while it is
live. To acquire, a run reads the claims and, if there are none or the highest has expired,
creates generation + 1 with a write that fails when the object exists
(``emotions.create_if_absent``: a temporary file then ``os.link`` locally, so readers never see
a partial claim; a PUT with ``If-None-Match: *`` on S3; ``ifGenerationMatch=0`` on GCS). Exactly
one racer creates it; the others read again and name it. The winner deletes the older
generations (a generation that vanishes between a listing and its read still counts, so no racer
creates a number twice). Renewing rewrites one's own generation and checks it is still
the highest; releasing overwrites it with an expired claim, so the highest number always stays
and is never reused. No settle wait: ``acquire`` is one listing and one write. Two runs hold a
name at once only if one stalls past its expiry and comes back (its next renewal finds its
claim gone or outranked, and the heartbeat sets ``lost``).

``write-wait-read`` (stores without create-if-absent, e.g. an S3-compatible store that ignores
``If-None-Match``, which a probe detects once per bucket; GCS without the client library).
Claims are ``<name>.<owner>.json``: write, wait ``settle_s``, read back; the first live claim
holds, ordered by when each was first written by the storage's own clock (the object's
modification time as listed, kept in the claim through renewals), then by owner. A run that
finds live claims also waits ``settle_s`` and reads again before it names the holder. Two runs
can both hold a name only if a claim's write takes longer than ``settle_s`` minus the storage
clock's resolution (S3: 1 s) to become visible, or if a run stalls past its expiry. All runs
sharing a folder must use the same protocol (the same image and storage do).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from emotions.create_if_absent import create_if_absent
from emotions.storage import Folder

log = logging.getLogger("emotions.leases")

LEASE_TTL_S = 600.0  # a dead run's claim is free again after this; renewed every TTL / 3
SETTLE_S = 5.0  # write-wait-read only: wait between writing a claim and reading the claims back
CREATE_IF_ABSENT = "create-if-absent"
WRITE_WAIT_READ = "write-wait-read"


@dataclass(frozen=True)
class Claim:
    """One run's claim, as read back from storage."""

    name: str  # object name in the folder
    owner: str
    expires: float  # epoch seconds, by the owner's clock
    order: tuple  # first holds: (generation,) or (time first written by the storage's clock, owner)


def new_owner() -> str:
    """A run's name: host (the pod), the machine and process namespace it runs in, process, and a
    random part; safe in object names: ``<host>-<machine>-<pid>-<random>``."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]
    return f"{host}-{machine_id()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def machine_id() -> str:
    """8 hex digits naming this host, boot and pid namespace together: a pid means the same
    process only where all three match (pods of one name in two namespaces, or two containers
    on one node, share host names but not pids)."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(path) if path.endswith("/pid") else open(path).read().strip())
        except OSError:
            parts.append("?")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:8]


def owner_is_dead_here(owner: str) -> bool:
    """True if ``owner`` (a ``new_owner()`` name) was a process of this same host, boot and pid
    namespace that is gone: a killed run's claim, which a re-run on the same machine (or head
    pod) may take over at once. A process elsewhere, one still running, or a pid now reused by
    another process counts as alive (its claim expires as usual)."""
    parts = owner.rsplit("-", 3)
    if len(parts) != 4 or parts[1] != machine_id() or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


# ----------------------------------------------------------------------------- the lease


class Lease:
    """A lease on ``name`` in ``folder`` (see the module docstring for what it guarantees)."""

    def __init__(
        self, folder: Folder, name: str, owner: str, *, ttl_s: float = LEASE_TTL_S, settle_s: float = SETTLE_S
    ):
        assert "/" not in name and "." not in owner and "/" not in owner, (name, owner)
        self.folder, self.owner, self.ttl_s, self.settle_s = folder, owner, ttl_s, settle_s
        self.key = name  # what is leased: a date, "output", ...
        self.name: str | None = None  # this run's claim object, once written
        self.holder: Claim | None = None  # who holds it when acquire() failed
        self.order: tuple | None = None  # write-wait-read: this claim's place in line, fixed when acquired
        self.protocol: str | None = None  # decided by the first acquire()
        self.lost = threading.Event()  # set by the heartbeat if another run took it over
        self._renewing = threading.Lock()

    # -- reading

    def claims(self) -> list[Claim]:
        """This name's claims, each read back, first holder first (a claim that cannot be read
        expires a TTL after it was written, so a torn or foreign object never blocks for good)."""
        out = []
        for info in self.folder.list():
            middle = self._middle(info.base_name)
            if middle is None:
                continue
            written = info.mtime.timestamp() if info.mtime else 0.0
            generation = int(middle) if middle.isdigit() and len(middle) == 10 else None
            try:
                data = json.loads(self.folder.read_bytes(info.base_name))
                owner, expires = str(data["owner"]), float(data["expires"])
                first = float(data["order"][0]) if data.get("order") else written
            except Exception:  # gone, torn or not ours
                if not self.folder.exists(info.base_name):  # taken over between the listing and the read
                    if generation is not None:  # still counts: no later acquirer may create it again
                        out.append(Claim(info.base_name, "taken over", 0.0, (generation,)))
                    continue
                owner, expires, first = ("unknown" if generation is not None else middle), written + self.ttl_s, written
            order = (generation,) if generation is not None else (first, owner)
            if owner != self.owner and owner_is_dead_here(owner):
                expires = 0.0  # a killed run on this host (a re-run on the same machine or head pod)
            out.append(Claim(info.base_name, owner, expires, order))
        if any(len(c.order) == 1 for c in out):  # generations: the highest holds
            return sorted((c for c in out if len(c.order) == 1), key=lambda c: c.order, reverse=True)
        return sorted(out, key=lambda c: c.order)

    def _middle(self, base_name: str) -> str | None:
        """The generation or owner part of a claim's object name; None if it is not a claim of
        this name (other names, temporaries: .<name>.partial-...)."""
        if not (base_name.startswith(f"{self.key}.") and base_name.endswith(".json")):
            return None
        middle = base_name[len(self.key) + 1 : -len(".json")]
        return middle if middle and "." not in middle else None

    # -- acquiring

    def acquire(self) -> bool:
        """Claim the name unless another run holds it; True if this run now holds it."""
        self.holder = None
        if self.protocol != WRITE_WAIT_READ:
            for _ in range(5):  # a lost race re-reads; the holder may release in between
                now, claims = time.time(), self.claims()
                generations = [c for c in claims if len(c.order) == 1]
                top = generations[0] if generations else None
                if top and top.expires > now:
                    self.holder = top
                    return top.owner == self.owner and self._take(top)
                created = create_if_absent(self.folder, self._generation_name(top), self._claim_bytes)
                if created is None:
                    break  # this storage has no create-if-absent
                self.protocol = CREATE_IF_ABSENT
                if created:
                    self.name = self._generation_name(top)
                    for stale in generations:  # expired (top) or left behind: outranked either way
                        if stale.expires <= now:
                            log.warning(
                                "%s: taking over the expired lease of %s (expired %.0f s ago)",
                                self.key,
                                stale.owner,
                                now - stale.expires,
                            )
                        self._delete(stale.name)
                    return True
            else:
                return False
        self.protocol = WRITE_WAIT_READ
        return self._acquire_settled()

    def _take(self, claim: Claim) -> bool:
        """This run's own live claim (a second acquire): hold it again."""
        self.name, self.holder = claim.name, None
        return True

    def _generation_name(self, top: Claim | None) -> str:
        return f"{self.key}.{(top.order[0] + 1) if top else 1:010d}.json"

    def _acquire_settled(self) -> bool:
        self.name = f"{self.key}.{self.owner}.json"
        now, claims, live = self._read()
        if live:  # held or being claimed. A claim ordered before these may not be visible yet:
            time.sleep(self.settle_s)  # after settle_s it is, and the first live claim holds
            now, claims, live = self._read()
        if live:
            self.holder = live[0]
            return False
        for stale in (c for c in claims if c.expires <= now):
            log.warning(
                "%s: taking over the expired lease of %s (expired %.0f s ago)",
                self.key,
                stale.owner,
                now - stale.expires,
            )
            self._delete(stale.name)
        self._write()
        time.sleep(self.settle_s)
        now = time.time()
        live = [c for c in self.claims() if c.expires > now]
        if live and live[0].owner == self.owner:
            self.order = live[0].order  # kept through renewals, which change the object's time
            return True
        self.holder = live[0] if live else None
        self._delete(self.name)
        return False

    def _read(self) -> tuple[float, list[Claim], list[Claim]]:
        """(now, the claims, the other runs' live claims among them, first holder first)."""
        now, claims = time.time(), self.claims()
        return now, claims, [c for c in claims if c.expires > now and c.owner != self.owner]

    # -- holding

    def renew(self) -> bool:
        """Extend the lease; False if this run lost it (it stalled past the expiry and another run
        took over: its claim is gone or outranked). Storage errors propagate."""
        with self._renewing:  # the heartbeat and a check before a commit may renew at once
            if not any(c.name == self.name and c.owner == self.owner for c in self.claims()):
                return False  # deleted by the run that took over: never write it back
            self._write()
            claims = self.claims()
            if self.protocol == WRITE_WAIT_READ:  # the first live claim holds
                claims = [c for c in claims if c.expires > time.time()]
            # create-if-absent: the highest generation holds, live or not: a higher one outranks ours
            if claims and claims[0].name == self.name and claims[0].owner == self.owner:
                return True
            self._delete(self.name)
            return False

    def release(self) -> None:
        """Give the name up. Create-if-absent: this run's claim is overwritten by an expired one (a
        tombstone), never deleted, so generation numbers are never used twice and a run that lost
        its claim cannot delete a later holder's; nothing is written if the claim is no longer
        this run's. Write-wait-read: the claim (named by its owner) is deleted."""
        if self.name and self.protocol == CREATE_IF_ABSENT:
            if any(c.name == self.name and c.owner == self.owner for c in self.claims()):
                self.folder.write_bytes_atomic(self._claim_bytes(expires=0.0), self.name)
        elif self.name:
            self._delete(self.name)
        self.order = None

    @contextmanager
    def held(self):
        """Renew every ``ttl / 3`` while the block runs; release at the end."""
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        log.error(
                            "%s: lease lost to another run; this run's output is still exactly "
                            "once per input file, but the two runs did the same work",
                            self.key,
                        )
                        self.lost.set()
                        return
                except Exception as error:  # storage hiccup: try again at the next beat
                    log.warning("%s: could not renew the lease (%s); retrying", self.key, error)

        thread = threading.Thread(target=heartbeat, name=f"lease-{self.key}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.release()

    def _claim_bytes(self, expires: float | None = None) -> bytes:
        now = time.time()
        claim = {
            "owner": self.owner,
            "name": self.key,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "written": now,
            "expires": now + self.ttl_s if expires is None else expires,
            "order": self.order and list(self.order),
        }
        return json.dumps(claim).encode()

    def _write(self) -> None:
        self.folder.write_bytes_atomic(self._claim_bytes(), self.name)

    def _delete(self, name: str) -> None:
        try:
            self.folder.delete(name)
        except FileNotFoundError:
            pass
