"""Server-sent events: `data: <json>` per event, then `data: [DONE]`.

A client that stops reading holds no engine slot (its job ends when its generation does), and
one that reads nothing for `send_timeout_s` is cut off, so it holds no connection either."""

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.http_errors import error_event

log = logging.getLogger(__name__)


class _SlowReader(Exception):
    pass


class TimedStreamingResponse(StreamingResponse):
    """A streaming response whose every send must complete within `send_timeout_s`."""

    def __init__(self, content: AsyncIterator[str], send_timeout_s: float, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.send_timeout_s = send_timeout_s

    async def stream_response(self, send) -> None:
        async def timed_send(message) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                raise _SlowReader from None

        try:
            await super().stream_response(timed_send)
        except _SlowReader:
            log.warning("a streaming client read nothing for %.0f s; closing its stream", self.send_timeout_s)
            await self.body_iterator.aclose()  # its job, if still running, is aborted


def sse_response(events: AsyncIterator[dict], send_timeout_s: float, openai: bool = False) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, allow_nan=False)}\n\n"
        except Exception as exc:  # the status is already sent: report in the stream
            log.error("stream failed: %s: %s", type(exc).__name__, exc)
            yield f"data: {json.dumps(error_event(exc, openai))}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return TimedStreamingResponse(body(), send_timeout_s, media_type="text/event-stream",
                                  headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
