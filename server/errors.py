"""The server's own error types: what a request's journey or the engine can raise besides the
library's (`fsrl.errors`). Plain exceptions, no HTTP: `server/http_errors.py` maps every type
to its status, type and code, so the engine never imports the web framework."""

from __future__ import annotations

from fsrl.errors import FsrlError, NotFoundError


class InvalidField(FsrlError):
    """A request value that only the server can judge (against the SAE, model or caps)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(NotFoundError):
    """An OpenAI `model` that is neither the base model nor a loaded adapter."""

    field = "model"


class Overloaded(FsrlError):
    """The queue is full; try again in a moment."""


class EngineStopped(Overloaded):
    """The generation worker has died; nothing will be generated until a restart."""


class GenerationFailed(FsrlError):
    """This request's generation failed; the message says why where that is safe to show."""
