"""What can go wrong while building, and whether it is worth another attempt."""

from __future__ import annotations


class BuildError(RuntimeError):
    """The build cannot finish; the message says what is missing or broken."""


class UnavailableError(Exception):
    """A source does not have (all of) a repo's files."""


class CorruptFileError(Exception):
    """A source file does not match its expected size or hash."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def is_transient(err: BaseException) -> bool:
    """Network trouble worth retrying: connection errors, timeouts, 408/429/5xx answers."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OfflineModeIsEnabled):
            return False
        if isinstance(current, HfHubHTTPError):
            status = getattr(current.response, "status_code", None)
            return status in (408, 429) or (status is not None and status >= 500)
        if isinstance(current, httpx.TransportError | ConnectionError | TimeoutError):
            return True
        current = current.__cause__ or current.__context__
    return False


def auth_hint(err: BaseException) -> str:
    """What to do about a refused hub request."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return " (pass a Hugging Face token: HF_TOKEN, or the build secret hf_token)"
    return ""
