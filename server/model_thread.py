"""The one thread that runs the model: a server's threading policy for torch on a CPU.

PyTorch's OpenMP (libgomp) keeps a pool of worker threads for every thread that
has run a parallel op. Once pooled threads outnumber the cores, idle workers stop spinning and
sleep, so every op pays a wake-up: on 2 cores a decode step run from a second thread took
1.5-2.5x as long as the same step from the thread that had loaded the model. A server runs the
model off its event loop, so the model gets one thread that holds all of torch's intra-op
threads, and every other thread runs torch single-threaded (no pool of its own).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class ModelThread:
    """The one thread that runs the model, with all of torch's intra-op threads.

    Creating it hands torch's thread count to the new thread and sets 1 for the creating thread
    and for threads started later; `close` gives the count back.
    """

    def __init__(self, name: str = "fsrl-model"):
        self.threads = torch.get_num_threads()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._claim)
        self._executor.submit(lambda: None).result()  # the thread claims its count before we drop ours
        torch.set_num_threads(1)  # also the count threads started from now on begin with

    def _claim(self) -> None:
        torch.get_num_threads()  # the thread's one-time init reads the global count: do it first
        torch.set_num_threads(self.threads)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run `fn` on the model thread and wait for its result (exceptions come through)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future:
        """Run `fn` on the model thread (after what is already queued there) without waiting."""
        return self._executor.submit(fn, *args, **kwargs)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        torch.set_num_threads(self.threads)
