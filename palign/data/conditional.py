"""Conditional writes to one object on an object store: the ground a lock stands on there.

``pyarrow.fs`` writes objects whole but unconditionally, so two writers cannot tell which of
them won. S3 and GCS can: a write may be made on the condition that the object does not exist
yet (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) or that it is still the version read
(S3 ``If-Match`` on its ETag, GCS ``ifGenerationMatch`` on its generation). The store checks the
condition and writes in one step, so of two writers at once exactly one succeeds and the other
gets ``Conflict``, however late either request lands.

Each read also gives the object's age by the store's own clock (its last-modified time against
the store's current time, from the same response), so a writer whose clock is off cannot make
its object look fresh or stale.

S3 goes through boto3 with the standard ``AWS_*`` environment (the same variables pyarrow uses,
``AWS_ENDPOINT_URL_S3`` for S3-compatible stores included); GCS through google-cloud-storage
(the ``gcs`` extra) with Google's application default credentials.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote

from palign.data import storage


class Conflict(Exception):
    """The object is not as the condition required: it exists (create), or it was replaced or
    removed since it was read (replace, delete)."""


@dataclass(frozen=True)
class Version:
    """One version of an object as read: its bytes, the tag that names this version (an S3
    ETag, a GCS generation) and how long ago it was written, by the store's clock."""

    data: bytes
    tag: str
    age_s: float


class ConditionalObject(Protocol):
    uri: str

    def read(self) -> Version | None:
        """The object's current version; None if there is none."""

    def create(self, data: bytes) -> str:
        """Write the object if there is none; its new tag. ``Conflict`` if there is one."""

    def replace(self, data: bytes, tag: str) -> str:
        """Overwrite the object if it is still version ``tag``; the new tag. ``Conflict`` if
        it was replaced or removed since."""

    def delete(self, tag: str) -> None:
        """Remove the object if it is still version ``tag`` (gone already: nothing to do).
        ``Conflict`` if it was replaced since."""


def open_object(uri: str) -> ConditionalObject:
    """The object at ``uri`` (``s3://`` or ``gs://``), for conditional reads and writes."""
    kind = storage.scheme(uri)
    bucket, _, key = uri.split("://", 1)[-1].strip("/").partition("/")
    if not bucket or not key:
        raise storage.StorageError(f"{uri}: names no bucket and object")
    if kind == "s3":
        return S3Object(uri, bucket, key)
    if kind in ("gs", "gcs"):
        return GCSObject(uri, bucket, key)
    raise storage.StorageError(f"{uri}: conditional writes need s3:// or gs://")


def _age(last_modified: datetime | None, now: datetime | None) -> float:
    """Seconds from ``last_modified`` to ``now``, both the store's times (0 when either is
    missing, or the store's times run backwards)."""
    if last_modified is None or now is None:
        return 0.0
    return max(0.0, (now - last_modified).total_seconds())


def _http_date(text: str | None) -> datetime | None:
    try:
        return parsedate_to_datetime(text) if text else None
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=8)
def _s3_client(env: tuple[tuple[str, str], ...]) -> Any:
    """One boto3 S3 client per ``AWS_*`` environment (``env``, the cache key): making one
    loads S3's whole service description, about a second; a client is safe across threads."""
    import boto3
    from botocore.config import Config

    # Bounded waits: a heartbeat stuck on a dead connection must give up well within a lock's
    # stale time. A write retried after its first try landed gets Conflict; the lock then
    # recognises its own write by the token in it.
    return boto3.session.Session().client("s3", config=Config(
        connect_timeout=10, read_timeout=30, retries={"mode": "standard", "max_attempts": 4}))


class S3Object:
    """An S3 object, or one on an S3-compatible store that honours ``If-Match`` and
    ``If-None-Match`` on PutObject (AWS S3 since 2024, moto; check others: a store that
    ignores them makes these writes unconditional)."""

    def __init__(self, uri: str, bucket: str, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        self.uri, self.bucket, self.key = uri, bucket, key
        self._error = (ClientError, BotoCoreError)  # answers, and connections that failed
        self._client = _s3_client(tuple(sorted((k, v) for k, v in os.environ.items()
                                               if k.startswith("AWS_"))))

    def _status(self, err: Exception) -> tuple[int, str]:
        response: dict[str, Any] = getattr(err, "response", {}) or {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return int(status or 0), str(response.get("Error", {}).get("Code", ""))

    def _conflict(self, err: Exception) -> bool:
        """A refused condition: 412 (not as expected) or 409 (a conditional write racing with
        another on S3)."""
        status, code = self._status(err)
        return status in (409, 412) or code in ("PreconditionFailed",
                                                "ConditionalRequestConflict")

    def read(self) -> Version | None:
        try:
            got = self._client.get_object(Bucket=self.bucket, Key=self.key)
        except self._error as err:
            if self._status(err)[0] == 404:
                return None
            raise OSError(f"could not read {self.uri}: {err}") from err
        data = got["Body"].read()
        now = _http_date(got["ResponseMetadata"].get("HTTPHeaders", {}).get("date"))
        return Version(data, got["ETag"], _age(got.get("LastModified"), now))

    def create(self, data: bytes) -> str:
        try:
            return self._client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                           IfNoneMatch="*")["ETag"]
        except self._error as err:
            if self._conflict(err):
                raise Conflict(f"{self.uri} exists") from err
            raise OSError(f"could not create {self.uri}: {err}") from err

    def replace(self, data: bytes, tag: str) -> str:
        try:
            return self._client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                           IfMatch=tag)["ETag"]
        except self._error as err:
            if self._conflict(err) or self._status(err)[0] == 404:
                raise Conflict(f"{self.uri} is no longer version {tag}") from err
            raise OSError(f"could not replace {self.uri}: {err}") from err

    def delete(self, tag: str) -> None:
        # Compared first as well: a store that ignores If-Match on DeleteObject (not every
        # S3-compatible one honours it) still deletes only what was ours a round trip ago.
        now = self.read()
        if now is None:
            return
        if now.tag != tag:
            raise Conflict(f"{self.uri} is no longer version {tag}")
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=tag)
        except self._error as err:
            status, code = self._status(err)
            if status == 404:
                return
            if self._conflict(err):
                raise Conflict(f"{self.uri} is no longer version {tag}") from err
            if status != 501 and code != "NotImplemented":
                raise OSError(f"could not delete {self.uri}: {err}") from err
            self._client.delete_object(Bucket=self.bucket, Key=self.key)  # compared above


class GCSObject:
    """A GCS object, through google-cloud-storage's generation preconditions."""

    def __init__(self, uri: str, bucket: str, key: str) -> None:
        try:
            from google.api_core import exceptions
            from google.cloud import storage as gcs
        except ImportError as err:
            raise storage.StorageError(
                f"{uri}: a lock on gs:// needs google-cloud-storage; install palign's gcs "
                "extra (pip install 'palign[gcs]')") from err
        self.uri, self.bucket, self.key = uri, bucket, key
        self._failed = exceptions.PreconditionFailed
        self._missing = exceptions.NotFound
        self._api_error = exceptions.GoogleAPIError
        self._client = gcs.Client()
        self._blob = self._client.bucket(bucket).blob(key)

    def read(self) -> Version | None:
        for _ in range(5):  # replaced between the look at its metadata and the download
            # The metadata through the client's own authorised session, for the response's
            # Date header (the store's clock), which the Blob API does not pass on.
            url = self._client._connection.build_api_url(
                f"/b/{quote(self.bucket, safe='')}/o/{quote(self.key, safe='')}")
            got = self._client._http.get(url, timeout=30)
            if got.status_code == 404:
                return None
            if got.status_code != 200:
                raise OSError(f"could not read {self.uri}: HTTP {got.status_code} {got.text}")
            meta = json.loads(got.text)
            generation = int(meta["generation"])
            updated = datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
            try:
                data = self._blob.download_as_bytes(if_generation_match=generation)
            except (self._failed, self._missing):
                continue
            return Version(data, str(generation),
                           _age(updated, _http_date(got.headers.get("Date"))))
        raise OSError(f"could not read {self.uri}: it keeps changing")

    def _write(self, data: bytes, generation: int) -> str:
        try:
            self._blob.upload_from_string(data, if_generation_match=generation)
        except (self._failed, self._missing) as err:
            raise Conflict(f"{self.uri} is not at generation {generation}") from err
        except self._api_error as err:
            raise OSError(f"could not write {self.uri}: {err}") from err
        return str(self._blob.generation)

    def create(self, data: bytes) -> str:
        return self._write(data, 0)  # generation 0: only if there is no object

    def replace(self, data: bytes, tag: str) -> str:
        return self._write(data, int(tag))

    def delete(self, tag: str) -> None:
        try:
            self._blob.delete(if_generation_match=int(tag))
        except self._missing:
            return
        except self._failed as err:
            raise Conflict(f"{self.uri} is no longer generation {tag}") from err
        except self._api_error as err:
            raise OSError(f"could not delete {self.uri}: {err}") from err
