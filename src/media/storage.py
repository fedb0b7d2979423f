"""Where assets go: an S3-compatible bucket (boto3) or, for development, a local directory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from src.contract import one_line
from src.settings import Settings, StartupError

CONTENT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg", "mp4": "video/mp4"}
SKIP_CHECK = "STORAGE_CHECK=false skips this check"
CHECK_TIMEOUT_S = 5.0  # the start-up check's connect and read timeouts (one attempt)


class Storage(Protocol):
    """Stores bytes under a key in one bucket."""

    bucket: str

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` at ``key``; raise on failure."""

    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it does not exist)."""


class S3Storage:
    """An S3-compatible bucket: path-style addressing, checksums only when required."""

    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.bucket_name
        self.endpoint = settings.bucket_endpoint_url
        self._settings = settings
        self._client = self._new_client(settings.storage_timeout_s, settings.storage_max_attempts)

    def _new_client(self, timeout_s: float, attempts: int) -> Any:
        import boto3
        from botocore.config import Config

        settings = self._settings
        return boto3.client(
            "s3",
            endpoint_url=settings.bucket_endpoint_url,
            aws_access_key_id=settings.bucket_access_key_id,
            aws_secret_access_key=settings.bucket_secret_access_key,
            region_name=settings.bucket_region or "us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=timeout_s,
                read_timeout=timeout_s,
            ),
        )

    def check(self) -> None:
        """One HEAD of the bucket within CHECK_TIMEOUT_S; a one-line StartupError if it fails."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"bucket {self.bucket!r} at {self.endpoint}"
        try:
            self._new_client(CHECK_TIMEOUT_S, 1).head_bucket(Bucket=self.bucket)
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", "?"))
            reason = {
                "404": "does not exist",
                "NoSuchBucket": "does not exist",
                "403": "refuses these credentials (BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY)",
            }.get(code, f"answered {code}")
            raise StartupError(f"storage check: {where} {reason}; {SKIP_CHECK}") from None
        except (BotoCoreError, OSError) as err:
            raise StartupError(
                f"storage check: cannot reach {where} ({one_line(err)}); {SKIP_CHECK}"
            ) from None

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload one object."""
        self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)

    def delete(self, key: str) -> None:
        """Remove one object."""
        self._client.delete_object(Bucket=self.bucket, Key=key)


class LocalStorage:
    """Writes the same keys under a directory (development and the demo)."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.bucket = bucket
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
                pass
        except OSError as err:
            raise StartupError(f"LOCAL_STORAGE_DIR {root} is not writable: {err.strerror}") from None

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write one file atomically (temporary file, then rename)."""
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, key: str) -> None:
        """Remove one file."""
        (self.root / key).unlink(missing_ok=True)


class JobObjects:
    """A storage view for one job that remembers what it stored, so a failed job can remove it."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.bucket = storage.bucket
        self.keys: list[str] = []

    def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store and remember ``key``."""
        self._storage.put(key, data, content_type)
        self.keys.append(key)

    def remove_all(self) -> list[str]:
        """Remove every object stored so far (best effort); return the keys that could not be removed."""
        left = []
        for key in self.keys:
            try:
                self._storage.delete(key)
            except Exception:
                left.append(key)
        self.keys = left
        return left


def build_storage(settings: Settings) -> Storage:
    """The storage backend the settings name (settings guarantee exactly one), checked (STORAGE_CHECK)."""
    if settings.local_storage_dir is not None:
        return LocalStorage(settings.local_storage_dir, settings.bucket_name)
    storage = S3Storage(settings)
    if settings.storage_check:
        storage.check()
    return storage


def is_outage(err: BaseException) -> bool:
    """True for what a storage service or the network can do (refuse, time out, answer an error)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(err, BotoCoreError | ClientError | OSError)
