"""Typed errors. The CLI prints them as one line; the server maps them to HTTP codes."""


class FsrlError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch. Never a bug."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = "invalid_request"


class NotFoundError(FsrlError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class ConflictError(FsrlError):
    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class ForbiddenError(FsrlError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class MismatchError(FsrlError):
    """An adapter or SAE made for another base model, SAE or layer."""

    code = "mismatch"


class CorruptFileError(FsrlError):
    code = "corrupt_file"
