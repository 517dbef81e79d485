"""Create-if-absent writes on each store: write an object unless it exists; of racers, exactly
one creates it.

    create_if_absent(folder, name, data) -> True: written | False: it was there | None: not here
        local disk  a temporary file, then os.link (fails if the name exists; readers never see a
                    partial object); None on a filesystem without hard links
        S3          PUT with ``If-None-Match: *`` (boto3; credentials and endpoint from the
                    standard AWS variables), once a probe found that the bucket honours it (some
                    S3-compatible stores ignore the header, which would let every racer win)
        GCS         upload with ``ifGenerationMatch=0`` (only with google-cloud-storage installed)
        elsewhere   None

``emotions.leases`` writes its claims with it, and falls back to write-wait-read where it gives
None.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable

from emotions.storage import Folder

log = logging.getLogger("emotions.leases")  # its warnings are the leases'


def create_if_absent(folder: Folder, name: str, data: Callable[[], bytes]) -> bool | None:
    """Write ``data()`` to ``folder/name`` unless it exists: True if written, False if it was
    there, None if this storage offers no create-if-absent (the caller falls back to
    write-wait-read). ``data`` is called just before the write, so an expiry in it is not aged
    by the one-time set-up (an S3 client, the probe)."""
    if folder.is_local:
        return _create_local(folder, name, data)
    if type(folder.fs).__name__ == "S3FileSystem":
        return _create_s3(folder, name, data)
    if type(folder.fs).__name__ == "GcsFileSystem":
        return _create_gcs(folder, name, data)
    return None


def _create_local(folder: Folder, name: str, data: Callable[[], bytes]) -> bool | None:
    folder.make()
    temp = folder.path(f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(temp, "wb") as f:
        f.write(data())
    try:
        os.link(temp, folder.path(name))  # fails if the name exists: the claim appears whole or not at all
        return True
    except FileExistsError:
        return False
    except OSError as error:  # a filesystem without hard links (some FUSE/SMB mounts)
        log.warning("%s: no hard links (%s); leases fall back to write-wait-read", folder.uri, error)
        return None
    finally:
        os.unlink(temp)


_s3_clients: dict[str, object] = {}  # region -> boto3 client (thread-safe, made once)
_s3_support: dict[str, bool] = {}  # bucket -> whether it honours If-None-Match (probed once)
_s3_lock = threading.Lock()


def _s3(region: str) -> object:
    with _s3_lock:
        if region not in _s3_clients:
            import boto3  # credentials and AWS_ENDPOINT_URL from the standard variables, as pyarrow reads them

            _s3_clients[region] = boto3.client("s3", region_name=region or None)
        return _s3_clients[region]


def _put_if_absent(client, bucket: str, key: str, data: bytes) -> bool:
    from botocore.exceptions import ClientError, ParamValidationError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return True
    except ParamValidationError as error:  # a botocore from before S3's conditional writes (2024)
        raise RuntimeError(
            f"this botocore cannot send If-None-Match ({error}); install boto3>=1.36 (pip install -U boto3)"
        ) from error
    except ClientError as error:
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):  # 412: exists; 409: a concurrent conditional write won
            return False
        raise


def _create_s3(folder: Folder, name: str, data: Callable[[], bytes]) -> bool | None:
    from botocore.exceptions import ClientError

    client = _s3(getattr(folder.fs, "region", "") or "")
    bucket, _, key = folder.path(name).partition("/")
    if bucket not in _s3_support:  # a store that ignores the header would let every racer win
        probe = "/".join(p for p in (folder.root.partition("/")[2], f".create-if-absent-probe-{uuid.uuid4().hex}") if p)
        try:
            _s3_support[bucket] = _put_if_absent(client, bucket, probe, b"") and not _put_if_absent(
                client, bucket, probe, b""
            )
        except ClientError as error:  # only "not implemented" means no conditional PUT; others are errors
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status != 501 and error.response.get("Error", {}).get("Code") != "NotImplemented":
                raise
            log.warning("s3://%s: no conditional PUT (%s)", bucket, error)
            _s3_support[bucket] = False
        finally:
            try:
                client.delete_object(Bucket=bucket, Key=probe)
            except ClientError:
                pass
        if not _s3_support[bucket]:
            log.warning("s3://%s ignores If-None-Match; leases fall back to write-wait-read", bucket)
    return _put_if_absent(client, bucket, key, data()) if _s3_support[bucket] else None


def _create_gcs(folder: Folder, name: str, data: Callable[[], bytes]) -> bool | None:
    try:
        from google.api_core.exceptions import PreconditionFailed
        from google.cloud import storage as gcs
    except ImportError:  # google-cloud-storage is optional
        return None
    bucket, _, key = folder.path(name).partition("/")
    try:
        gcs.Client().bucket(bucket).blob(key).upload_from_string(data(), if_generation_match=0)
        return True
    except PreconditionFailed:
        return False
