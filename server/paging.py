"""Adapter paging: any number of adapters loaded in host memory, a fixed number of device slots.

Both engines keep `--adapter-slots` adapter versions on the device and the rest in host memory
(the default engine: device copies of the registry's host adapters; the vLLM engine: its bank
inside the compiled model). A job is admitted only once every adapter version it names sits in
a slot; seating it sends the least recently used versions out, never one that a running job
holds. A job that cannot be seated now waits (its turn comes when a running job ends); it never
fails for want of a slot, and jobs behind it wait their turn too, so none is passed over for
ever. A version the registry stopped serving (replaced or unloaded) leaves its slot when the
last job holding it ends, so a running request finishes on the weights it started with.

`SlotPager` is the bookkeeping alone (no tensors, no locks): each engine calls it from one
thread, or under its own lock, and moves the weights itself.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class Seating(Generic[K]):
    """What seating a job takes: versions to send out of their slots first, then versions to
    copy in (each into a slot just freed or never used)."""

    evict: list[K] = field(default_factory=list)
    page_in: list[K] = field(default_factory=list)


class SlotPager(Generic[K]):
    """`slots` device slots over adapter versions `K` (any hashable: the host adapter object, a
    bank key). `seat(keys)` pins a job's versions, `unpin(keys)` lets them go when it ends."""

    def __init__(self, slots: int):
        if slots < 1:
            raise ValueError("a pager needs at least one slot")
        self.slots = slots
        self._resident: OrderedDict[K, None] = OrderedDict()  # least recently used first
        self._pins: dict[K, int] = {}
        self._retired: set[K] = set()
        self.page_ins = 0   # versions copied onto the device, in all
        self.evictions = 0  # versions sent out to make room (not counting retired ones freed)

    def __contains__(self, key: object) -> bool:
        return key in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def pinned(self, key: K) -> int:
        return self._pins.get(key, 0)

    def seat(self, keys: Iterable[K]) -> Seating[K] | None:
        """Pin every version in `keys` in a slot, or nothing and None when they cannot all fit
        now (too many slots held by running jobs). The caller evicts, then pages in, before the
        job runs."""
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in self._resident]
        free = self.slots - len(self._resident)
        spare = [k for k in self._resident if not self._pins.get(k) and k not in wanted]  # LRU first
        if len(missing) > free + len(spare):
            return None
        seating: Seating[K] = Seating(evict=spare[:max(0, len(missing) - free)], page_in=missing)
        for k in seating.evict:
            del self._resident[k]
            if k in self._retired:
                self._retired.discard(k)
            else:
                self.evictions += 1
        for k in wanted:
            self._resident[k] = None
            self._resident.move_to_end(k)
            self._pins[k] = self._pins.get(k, 0) + 1
        self.page_ins += len(missing)
        return seating

    def unpin(self, keys: Iterable[K]) -> list[K]:
        """A job holding `keys` ended; returns the retired versions that left their slots now
        (the caller frees them on the device)."""
        freed = []
        for k in dict.fromkeys(keys):
            left = self._pins.get(k, 0) - 1
            if left > 0:
                self._pins[k] = left
                continue
            self._pins.pop(k, None)
            if k in self._retired and k in self._resident:
                del self._resident[k]
                self._retired.discard(k)
                freed.append(k)
        return freed

    def retire(self, key: K) -> bool:
        """The registry no longer serves `key`. True when it left its slot now (the caller frees
        it on the device); otherwise it leaves when its last job ends (`unpin` says so)."""
        if key not in self._resident:
            return False
        if self._pins.get(key):
            self._retired.add(key)
            return False
        del self._resident[key]
        return True
