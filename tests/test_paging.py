"""The adapter pager's bookkeeping (server/paging.py): a fixed number of slots, least recently
used out, never a version a running job holds, retired versions freed when their last job ends."""

import pytest

from server.paging import SlotPager


def test_a_version_pages_in_once_and_stays_while_slots_last():
    pager = SlotPager(2)
    first = pager.seat(["a"])
    assert (first.evict, first.page_in) == ([], ["a"])
    pager.unpin(["a"])
    again = pager.seat(["a"])
    assert (again.evict, again.page_in) == ([], []) and pager.page_ins == 1


def test_the_least_recently_used_unheld_version_goes_out():
    pager = SlotPager(2)
    for key in ("a", "b", "a"):  # b is now the least recently used
        pager.seat([key])
        pager.unpin([key])
    seating = pager.seat(["c"])
    assert (seating.evict, seating.page_in) == (["b"], ["c"])
    assert "a" in pager and "b" not in pager and pager.evictions == 1


def test_a_version_a_running_job_holds_is_never_sent_out_and_a_job_that_cannot_fit_waits():
    pager = SlotPager(2)
    pager.seat(["a"])
    pager.seat(["b"])               # both held by running jobs
    assert pager.seat(["c"]) is None  # waits: nothing changed
    assert "a" in pager and "b" in pager and pager.pinned("a") == 1 and pager.page_ins == 2
    pager.unpin(["a"])
    seating = pager.seat(["c"])
    assert (seating.evict, seating.page_in) == (["a"], ["c"])


def test_two_jobs_share_a_slot_and_it_is_held_until_both_end():
    pager = SlotPager(1)
    pager.seat(["a"])
    pager.seat(["a"])
    pager.unpin(["a"])
    assert pager.seat(["b"]) is None
    pager.unpin(["a"])
    assert pager.seat(["b"]).evict == ["a"]


def test_a_retired_version_leaves_at_once_when_free_or_when_its_last_job_ends():
    pager = SlotPager(2)
    pager.seat(["old"])
    assert pager.retire("old") is False and "old" in pager  # its job still runs on it
    pager.seat(["new"])
    assert pager.unpin(["old"]) == ["old"] and "old" not in pager
    pager.unpin(["new"])
    assert pager.retire("new") is True and len(pager) == 0
    assert pager.evictions == 0  # retiring is not eviction


def test_a_pager_needs_a_slot():
    with pytest.raises(ValueError):
        SlotPager(0)
