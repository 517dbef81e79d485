"""The one-line message ``emotions`` prints (exit status 2) for an error the user can fix."""

from __future__ import annotations

from emotions.config import ConfigError


def user_error(exc: Exception) -> str | None:
    """The one-line message of an error the user can fix (a bad flag, config, bundle, input,
    storage setting, or a run to start over); None for a bug, which keeps its traceback."""
    from emotions.bundle import BundleError
    from emotions.data import DataError
    from emotions.nightly import NightlyError
    from emotions.storage import StorageError
    from emotions.tagging import TaggingError
    from emotions.tagging.report import ReportError

    try:
        from emotions.training import ResumeError
    except ImportError:  # an older emotions.training: its resume errors are plain ValueErrors
        ResumeError = ConfigError
    fixable = (ConfigError, DataError, BundleError, NightlyError, ReportError, ResumeError, StorageError, TaggingError)
    if isinstance(exc, (*fixable, FileNotFoundError)):
        return one_line(str(exc))
    if isinstance(exc, OSError):  # pyarrow's filesystems: S3 without credentials or network, a full disk, ...
        return storage_hint(one_line(str(exc)))
    return None


def one_line(text: str) -> str:
    """``text`` on one line: "invalid configuration:\n  a\n  b" -> "invalid configuration: a; b"."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


def storage_hint(message: str) -> str:
    """An OSError's message, with what to set when it comes from an object store."""
    if "AWS Error" in message or "S3" in message:
        return (
            f"{message}. Check the S3 settings: credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE), AWS_ENDPOINT_URL for a non-AWS endpoint (MinIO, ...), AWS_DEFAULT_REGION, "
            "and that the endpoint is reachable from here"
        )
    if "GCS" in message or "google" in message.lower():
        return f"{message}. Check GOOGLE_APPLICATION_CREDENTIALS and that storage.googleapis.com is reachable"
    return message
