"""Leases under the races a review of the protocol found: a claim taken over between a listing
and its read, a run that lost its claim releasing it later, and whose claim counts as dead."""

from __future__ import annotations

import time

from emotions.leases import Lease, machine_id, new_owner, owner_is_dead_here
from emotions.storage import Folder


def test_a_claim_taken_over_between_listing_and_reading_still_counts(tmp_path, monkeypatch):
    """r lists the expired generation 1; before r reads it, w creates generation 2 and deletes
    1. r must not create generation 1 again (which would be absent, so r would hold it too)."""
    folder = Folder.from_uri(tmp_path / "leases")
    assert Lease(folder, "d", "killed-run", ttl_s=0.01).acquire()  # generation 1, soon expired
    time.sleep(0.05)
    w, r = Lease(folder, "d", new_owner(), ttl_s=30), Lease(folder, "d", new_owner(), ttl_s=30)
    real_list, raced = Folder.list, []

    def stale_list(self, *parts):
        listing = real_list(self, *parts)
        if not raced:  # r's first listing: w takes over before r reads what it listed
            raced.append(True)
            assert w.acquire()
        return listing

    monkeypatch.setattr(Folder, "list", stale_list)
    assert not r.acquire()
    assert r.holder.owner == w.owner
    monkeypatch.setattr(Folder, "list", real_list)
    holders = [c for c in w.claims() if c.expires > time.time()]
    assert [c.owner for c in holders] == [w.owner]  # one holder, never two


def test_a_run_that_lost_its_claim_never_releases_a_later_holders(tmp_path):
    folder = Folder.from_uri(tmp_path / "leases")
    stalled = Lease(folder, "d", new_owner(), ttl_s=0.2)
    assert stalled.acquire()
    time.sleep(0.3)  # it stalls past its expiry
    taker = Lease(folder, "d", new_owner(), ttl_s=30)
    assert taker.acquire()
    taker.release()  # done; a tombstone keeps its generation number taken
    later = Lease(folder, "d", new_owner(), ttl_s=30)
    assert later.acquire() and later.name != stalled.name
    assert not stalled.renew()
    stalled.release()  # the stalled run comes back and gives up what it thinks it holds
    third = Lease(folder, "d", new_owner(), ttl_s=30)
    assert not third.acquire() and third.holder.owner == later.owner  # the later holder still holds


def test_only_a_gone_process_of_this_machine_and_pid_namespace_counts_as_dead():
    me = new_owner()
    host, machine, pid, rand = me.rsplit("-", 3)
    assert machine == machine_id() and int(pid) > 0
    assert not owner_is_dead_here(me)  # alive
    assert owner_is_dead_here(f"{host}-{machine}-999999999-{rand}")  # gone, here
    other = "0" * 8 if machine != "0" * 8 else "1" * 8
    assert not owner_is_dead_here(f"{host}-{other}-999999999-{rand}")  # same host name, another namespace
    assert not owner_is_dead_here("run-a") and not owner_is_dead_here("unknown")
