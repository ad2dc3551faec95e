"""Server-sent events: `data: <json>` per event, then `data: [DONE]`."""

import json
import logging
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from server.errors import error_event

log = logging.getLogger(__name__)


def sse_response(events: AsyncIterator[dict]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as exc:  # the status is already sent: report in the stream
            log.error("stream failed: %s: %s", type(exc).__name__, exc)
            yield f"data: {json.dumps(error_event(exc))}\n\n"
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
