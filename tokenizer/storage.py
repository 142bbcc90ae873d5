"""Where a shard folder lives: a local path or any URL fsspec reads (s3://, gs://, az://, http(s)://,
hf://, file://), read by byte range with timeouts and retries.

A local folder is read with plain file calls (no fsspec in the way of the page cache). A URL goes
through fsspec; its protocol package (s3fs, gcsfs, adlfs, huggingface_hub; aiohttp for http) must
be installed (`pip install -e .[s3]` and so on, see pyproject.toml). Credentials and endpoints come
from the environment, never from a config: AWS_ACCESS_KEY_ID / AWS_ENDPOINT_URL_S3 for s3,
GOOGLE_APPLICATION_CREDENTIALS for gs, AZURE_STORAGE_* for az, HF_TOKEN for hf, and fsspec's own
FSSPEC_<PROTOCOL>_<OPTION> variables for anything else.

A read that fails is retried with doubling backoff, the same bytes each time: a transient failure
delays a read and never changes what it returns. After the last attempt the `StorageError` names
the URL, the byte range and the last error. A missing file is not retried (it is damage, not a
hiccup) and raises FileNotFoundError.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.errors import UserError
from pretrain.files import atomic_write_bytes, file_sha256, remove_partials

logger = logging.getLogger(__name__)

HASH_CHUNK = 8 << 20
"""Bytes per range request when a remote file is hashed whole."""


class StorageError(UserError):
    """Bytes of a shard folder could not be read or written, after every retry."""


@dataclass(frozen=True)
class ReadPolicy:
    """How hard a remote read tries before it gives up (local files are read once)."""

    timeout_s: float = 60.0
    """Limit of one request (connect and read), passed to the protocol's client (http, s3)."""
    retries: int = 5
    """Attempts after the first one."""
    backoff_s: float = 1.0
    """Wait before the first retry; it doubles with every further retry (capped at 30 s)."""


DEFAULT_POLICY = ReadPolicy()


def is_url(location: str | os.PathLike) -> bool:
    """True for "scheme://..." (file:// included); plain paths are local."""
    return "://" in str(location)


def _storage_options(protocol: str, policy: ReadPolicy) -> dict:
    """Per-protocol timeout settings; the protocol client's own retries are turned off, so that
    `ReadPolicy` alone decides how long a read may take."""
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=policy.timeout_s)}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": policy.timeout_s,
                                  "read_timeout": policy.timeout_s, "retries": {"max_attempts": 1}}}
    return {}


def _refused(err: Exception) -> bool:
    """An answer that a retry would only repeat: an HTTP 4xx other than timeout and rate limit."""
    status = getattr(err, "status", None) or getattr(err, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _unreachable(err: FileNotFoundError) -> bool:
    """fsspec's HTTP client reports any failed size request as FileNotFoundError; one raised from a
    connection failure (no HTTP answer: refused, reset, timed out) says nothing about the file and is
    retried like any transient error. A real 404 comes from an answer with a status."""
    cause = err.__cause__
    if cause is None or getattr(cause, "status", None) is not None:
        return False
    name = type(cause).__name__
    return isinstance(cause, (OSError, TimeoutError)) or "Connection" in name or "Disconnected" in name


class Store:
    """A folder (local path or URL) whose files are read whole or by byte range."""

    def __init__(self, root: str | os.PathLike, policy: ReadPolicy = DEFAULT_POLICY):
        text = str(root)
        self.policy = policy
        self.local = not is_url(text) or text.startswith("file://")
        self.root = text.removeprefix("file://").rstrip("/") if self.local else text.rstrip("/")
        self._fs = None
        self._fs_pid = -1

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and (self.root, self.policy) == (other.root, other.policy)

    def __hash__(self) -> int:
        return hash((self.root, self.policy))

    def __getstate__(self) -> dict:
        # Spawned DataLoader workers receive the store pickled: each process opens its own client.
        return {**self.__dict__, "_fs": None, "_fs_pid": -1}

    def url(self, relative: str) -> str:
        """What to show a user for one file of the folder."""
        return f"{self.root}/{relative}" if relative else self.root

    def path(self, relative: str) -> Path:
        """The local path of a file (local stores only)."""
        assert self.local, "only a local store has paths"
        return Path(self.root) / relative

    @property
    def fs(self):
        """The fsspec filesystem, one per process (a forked client's connections are the parent's)."""
        if self._fs is None or self._fs_pid != os.getpid():
            import fsspec

            protocol = self.root.split("://", 1)[0]
            try:
                self._fs, _ = fsspec.core.url_to_fs(self.root, **_storage_options(protocol, self.policy))
            except ImportError as err:
                raise StorageError(f"{self.root} needs the fsspec package for {protocol}:// ({err}); install "
                                   "it: `pip install -e .[s3]`, `.[gcs]`, `.[azure]`, `.[http]` or `.[hub]`") from None
            except ValueError as err:  # fsspec knows no such protocol
                raise StorageError(f"{self.root}: the protocol {protocol}:// is unknown to fsspec ({err}); use a "
                                   "local path or s3://, gs://, az://, http(s)://, hf://") from None
            self._fs_pid = os.getpid()
        return self._fs

    # -- reads ---------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the folder itself is there (a URL without listing counts as there)."""
        if self.local:
            return Path(self.root).is_dir()
        return True  # http has no folders; a missing remote folder shows as a missing manifest

    def read_bytes(self, relative: str) -> bytes:
        if self.local:
            return self.path(relative).read_bytes()
        return self._retry(relative, lambda fs: fs.cat_file(self.url(relative)), "the whole file")

    def read_range(self, relative: str, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of a file (fewer where the file ends before stop)."""
        if stop <= start:
            return b""
        if self.local:
            with open(self.path(relative), "rb") as stream:
                stream.seek(start)
                return stream.read(stop - start)
        return self._retry(relative, lambda fs: fs.cat_file(self.url(relative), start=start, end=stop),
                           f"bytes {start}-{stop - 1}")

    def read_ranges(self, relative: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several ranges of one file; remote ones are requested concurrently (one round trip)."""
        if self.local or len(ranges) == 1:
            return [self.read_range(relative, lo, hi) for lo, hi in ranges]
        url = self.url(relative)
        return self._retry(relative, lambda fs: fs.cat_ranges([url] * len(ranges), [lo for lo, _ in ranges],
                                                              [hi for _, hi in ranges], on_error="raise"),
                           f"{len(ranges)} byte ranges")

    def size(self, relative: str) -> int:
        if self.local:
            return os.stat(self.path(relative)).st_size
        return int(self._retry(relative, lambda fs: fs.size(self.url(relative)), "its size"))

    def sha256(self, relative: str, size: int) -> str:
        """The sha256 of a file of `size` bytes (remote: read in HASH_CHUNK ranges, each retried)."""
        if self.local:
            return file_sha256(self.path(relative))
        digest = hashlib.sha256()
        for start in range(0, size, HASH_CHUNK):
            digest.update(self.read_range(relative, start, min(size, start + HASH_CHUNK)))
        return digest.hexdigest()

    def _retry(self, relative: str, call, what: str):
        url, policy, fs = self.url(relative), self.policy, self.fs  # no client, no retries
        started = time.monotonic()
        for attempt in range(policy.retries + 1):
            try:
                return call(fs)
            except FileNotFoundError as err:
                if not _unreachable(err):
                    raise
                last = err
                if attempt == policy.retries:
                    break
                wait = min(30.0, policy.backoff_s * 2 ** attempt)
                logger.warning("%s: reading %s failed (server unreachable: %s); retry %d of %d in %.1f s", url, what,
                               err.__cause__, attempt + 1, policy.retries, wait)
                time.sleep(wait)
            except (IsADirectoryError, PermissionError):
                raise
            except (TypeError, AttributeError, NotImplementedError):
                raise  # a bug or a client that cannot do this: retrying repeats it
            except Exception as err:  # noqa: BLE001 - every client raises its own kinds; retry them all
                last = err
                if _refused(err):
                    raise StorageError(f"{url}: reading {what} was refused ({type(err).__name__}: {err}); check the "
                                       "URL and the credentials in the environment") from None
                if attempt == policy.retries:
                    break
                wait = min(30.0, policy.backoff_s * 2 ** attempt)
                logger.warning("%s: reading %s failed (%s: %s); retry %d of %d in %.1f s", url, what,
                               type(err).__name__, err, attempt + 1, policy.retries, wait)
                time.sleep(wait)
        raise StorageError(f"{url}: could not read {what} after {policy.retries + 1} attempts in "
                           f"{time.monotonic() - started:.0f} s ({type(last).__name__}: {last}); check that the "
                           "server is reachable and the credentials in the environment, or raise "
                           "data.read_retries / data.read_timeout_s") from None

    # -- writes --------------------------------------------------------------------------------

    def remove_partials(self, relative_prefix: str) -> None:
        """Delete partial files a killed local writer left under names starting with `relative_prefix`
        (object stores have none: a PUT lands whole or not at all)."""
        if self.local:
            folder, _, prefix = relative_prefix.rpartition("/")
            remove_partials(self.path(folder) if folder else Path(self.root), prefix)

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write one file: atomically (temporary name, then rename) locally; one PUT on object stores."""
        if self.local:
            path = self.path(relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            return
        url = self.url(relative)
        try:
            self.fs.pipe_file(url, data)
        except Exception as err:  # noqa: BLE001
            raise StorageError(f"{url}: could not be written ({type(err).__name__}: {err}); check the "
                               "credentials and the endpoint in the environment") from None


def upload_folder(local: str | os.PathLike, url: str, policy: ReadPolicy = DEFAULT_POLICY) -> int:
    """Copy every file under `local` to `url`, the manifest last (a reader that finds the manifest
    finds every shard it names); returns the number of files written."""
    local = Path(local)
    target = Store(url, policy)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == "manifest.json")
    for path in files:
        target.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())
    return len(files)
