"""Where outputs live: a local folder or an object-store URI (s3://, gs://, ...), one API for both.

Every path option of the project (bundles, reports, sweeps, feature caches, tagged output) goes
through here, so ``s3://bucket/x`` is never mistaken for a local folder named ``s3:``. URIs are
opened with pyarrow's filesystems, configured by the standard environment variables only
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``;
``GOOGLE_APPLICATION_CREDENTIALS`` for gs://).

Folders written locally are uploaded with ``Folder.upload``, each file as one object, with a
caller-chosen file last: a reader that waits for that file never sees a partial folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

SINGLE_COPY_MAX = 5 * 2**30  # S3's CopyObject limit; pyarrow's move on S3 is one CopyObject
COPY_PART_BYTES = 256 * 2**20  # part size of a multipart copy (S3: 5 MiB to 5 GiB, 10,000 parts)


class StorageError(ValueError):
    """A path or URI that cannot be opened; the message names it and the fix."""


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def expand(path: str | Path) -> str:
    """Local paths get ~ expanded and made absolute; URIs pass through unchanged."""
    path = str(path)
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str | Path, *parts: str) -> str:
    """``join("s3://b/runs", "features")`` -> ``s3://b/runs/features``; local paths expanded."""
    return "/".join([expand(base).rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str | Path) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, URI prefix: "" locally, "s3://" etc.) for a path or URI."""
    uri = str(uri)
    if not is_uri(uri):
        return pafs.LocalFileSystem(), expand(uri), ""
    scheme = uri.split("://", 1)[0]
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as error:
        raise StorageError(
            f"{uri}: not a path or a filesystem URI pyarrow can open ({error}); "
            "use a local path, s3://bucket/prefix or gs://bucket/prefix"
        ) from error
    return fs, path, f"{scheme}://"


@dataclass(frozen=True)
class Folder:
    """A folder on any pyarrow filesystem; ``uri`` is how it was named, ``root`` its fs path."""

    fs: pafs.FileSystem
    root: str
    prefix: str  # "" for local paths, "s3://" etc. for URIs

    @classmethod
    def from_uri(cls, uri: str | Path) -> Folder:
        fs, root, prefix = filesystem(uri)
        return cls(fs, root.rstrip("/"), prefix)

    @property
    def uri(self) -> str:
        return self.prefix + self.root

    @property
    def is_local(self) -> bool:
        """A local disk (a plain path or file://): folders must exist before files go in."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return self.prefix + self.path(*parts)

    def child(self, *parts: str) -> Folder:
        return Folder(self.fs, self.path(*parts), self.prefix)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_file(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.File

    def make(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        if self.is_local:
            self.fs.create_dir(self.path(*parts[:-1]) if len(parts) > 1 else self.root, recursive=True)
        with self.fs.open_output_stream(self.path(*parts)) as f:
            f.write(data)

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        """Write so that readers see the whole file or none: one object PUT on an object store
        (complete on close), a temporary name then a rename on a local disk."""
        if not self.is_local:
            self.write_bytes(data, *parts)
            return
        partial = (*parts[:-1], f".{parts[-1]}.partial-{os.getpid()}")
        self.write_bytes(data, *partial)
        self.fs.move(self.path(*partial), self.path(*parts))

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def read_json(self, *parts: str) -> dict | None:
        """The file's JSON object; None if it is missing or not ours (Spark's _SUCCESS is empty)."""
        if not self.exists(*parts):
            return None
        try:
            data = json.loads(self.read_bytes(*parts))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, data: dict, *parts: str) -> None:
        self.write_text(json.dumps(data, indent=2, default=str) + "\n", *parts)

    def write_json_atomic(self, data: dict, *parts: str) -> None:
        """``write_json`` through ``write_bytes_atomic``: readers see the whole file or none."""
        self.write_bytes_atomic((json.dumps(data, indent=2, default=str) + "\n").encode(), *parts)

    def list(self, *parts: str) -> list[pafs.FileInfo]:
        """The folder's entries; none if it is not there. On a local disk pyarrow fails the whole
        listing when an entry vanishes between reading the folder and its stat (another process
        renaming a temporary file into place): that listing is taken again."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        for _ in range(9):
            try:
                return self.fs.get_file_info(selector)
            except FileNotFoundError:
                if not self.is_local:
                    raise
        return self.fs.get_file_info(selector)  # a tenth time, and its error

    def delete(self, *parts: str) -> None:
        """Remove a file or a folder (with everything in it); nothing if it is not there."""
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def upload(self, local: str | Path, last: str | None = None) -> None:
        """Copy the local folder ``local`` into this folder, file by file; ``last`` (a relative
        name, e.g. manifest.json) is copied after every other file."""
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(local).as_posix() == last)  # stable: ``last`` at the end
        for file in files:
            target = self.path(file.relative_to(local).as_posix())
            if self.is_local:
                self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(file), target, destination_filesystem=self.fs)

    def download(self, local: str | Path) -> Path:
        """Copy this folder into the local folder ``local``; returns it."""
        if not self.exists():
            raise StorageError(f"{self.uri} does not exist")
        pafs.copy_files(self.root, str(local), source_filesystem=self.fs)
        return Path(local)


def move_file(folder: Folder, source: str, target: str) -> None:
    """Move a file inside ``folder`` (relative names), replacing ``target``: a rename on a local
    disk; on object stores a server-side copy then a delete. On S3 a file over SINGLE_COPY_MAX
    is copied in parts (boto3's managed copy, UploadPartCopy), since one CopyObject stops at 5 GiB."""
    fs = folder.fs
    if isinstance(fs, pafs.S3FileSystem):
        size = fs.get_file_info(folder.path(source)).size or 0
        if size > SINGLE_COPY_MAX:
            _copy_s3_in_parts(fs, folder.path(source), folder.path(target))
            fs.delete_file(folder.path(source))
            return
    fs.move(folder.path(source), folder.path(target))


def _copy_s3_in_parts(fs: pafs.S3FileSystem, source: str, target: str) -> None:
    """Server-side multipart copy of ``bucket/key`` to ``bucket/key``; boto3 reads the same
    standard AWS variables as pyarrow (endpoint, credentials, region)."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    source_bucket, source_key = source.split("/", 1)
    bucket, key = target.split("/", 1)
    client = boto3.client("s3", region_name=fs.region or None)
    config = TransferConfig(multipart_threshold=COPY_PART_BYTES, multipart_chunksize=COPY_PART_BYTES)
    client.copy({"Bucket": source_bucket, "Key": source_key}, bucket, key, Config=config)
