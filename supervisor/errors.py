"""One error base, split by who is at fault; each carries its HTTP status and a string code.

The API turns any `SwapguardError` into `{"error": {"code", "message"}}` with `http_status`;
the CLI turns it into a message on stderr and an exit code.
"""

from __future__ import annotations


class SwapguardError(Exception):
    """Base of every error swapguard raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- the caller's fault ------------------------------------------------------------------


class BadRequest(SwapguardError):
    code = "bad_request"
    http_status = 400


class Forbidden(SwapguardError):
    code = "forbidden"
    http_status = 403


class NotFound(SwapguardError):
    code = "not_found"
    http_status = 404


class MethodNotAllowed(SwapguardError):
    code = "method_not_allowed"
    http_status = 405


class Conflict(SwapguardError):
    """The request is well formed but the current state forbids it (confirm after rollback)."""

    code = "conflict"
    http_status = 409


class PayloadTooLarge(SwapguardError):
    code = "payload_too_large"
    http_status = 413


class ConfigError(SwapguardError):
    """A config file is missing, unreadable or invalid; names the key and the file."""

    code = "config"
    http_status = 400

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        where = ", ".join(part for part in (file, f"key {key!r}" if key else None) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.key = key


# --- the environment's fault ---------------------------------------------------------------


class StateLocked(SwapguardError):
    """Another swapguard holds the state directory."""

    code = "state_locked"


class CheckpointError(SwapguardError):
    """git refused or failed; the tree is left as it was."""

    code = "checkpoint_failed"


class SnapshotError(SwapguardError):
    """A data snapshot or restore step failed; the journal allows a retry."""

    code = "snapshot_failed"


class InsufficientStorage(SwapguardError):
    """A data snapshot would not fit (free space, or state.keep_bytes): refused before the host
    is stopped, nothing changed. 507 as in WebDAV: the request is fine, the disk is not."""

    code = "insufficient_storage"
    http_status = 507


class NotReachable(SwapguardError):
    """The client could not reach the control socket."""

    code = "not_reachable"
    http_status = 503
