"""Typed errors. The CLI prints them as one line; the server maps each type to an HTTP answer
(`server/http_errors.py`), so nothing here knows about HTTP."""


class FsrlError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch. Never a bug."""


class NotFoundError(FsrlError):
    """No such adapter, feature, file or route."""


class ConflictError(FsrlError):
    """The name is taken, or the server holds as many as it may."""


class ForbiddenError(FsrlError):
    """A path outside the folder the caller may read from."""


class MismatchError(FsrlError):
    """An adapter or SAE made for another base model, SAE or layer."""


class CorruptFileError(FsrlError):
    """A file that exists but cannot be read as what it claims to be."""
