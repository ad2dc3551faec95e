"""Stop work for a client that went away, so its slot in the engine is freed."""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from fsrl.errors import FsrlError

T = TypeVar("T")


class ClientDisconnected(FsrlError):
    status_code = 499  # nginx's "client closed request"; nobody is there to read it
    code = "client_closed_request"


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (the engine aborts the job)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    raise ClientDisconnected("the client closed the connection")
