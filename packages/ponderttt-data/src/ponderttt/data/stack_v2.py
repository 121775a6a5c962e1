"""The Stack v2: file ids streamed with `datasets`, contents fetched from the Software Heritage S3 bucket.

The `bigcode/the-stack-v2*` datasets hold ids and metadata only (blob_id, repo_name, path, language,
src_encoding, length_bytes, is_generated, is_vendor, ...). Each file's content is the gzip object
`s3://softwareheritage/content/{blob_id}`. `StackV2Dataset` streams the id rows (from the hub, or from local
parquet files in the same schema), filters them (language, split by a stable hash of `repo_name/path`, this
process's shard), fetches contents in a bounded thread pool with timeouts, retries with exponential backoff
and an optional local content cache, and yields `RawFile`s in row order (for `ponderttt.data.cleaning`).

Its iterator state is the number of id rows consumed: a restored iterator skips that many rows (ids only, no
content is fetched for them) and continues with the same files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import gzip
import os
import pathlib
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

import boto3
import botocore
import botocore.config
import botocore.exceptions
import grain

from ponderttt.data.sources import RawFile, _check_split
from ponderttt.data.split import DEFAULT_SPLIT, SplitConfig, split_of

if TYPE_CHECKING:
    import botocore.client


class StackV2AccessError(RuntimeError):
    """The ids dataset or the content bucket refused access; the message says what to do."""


class StackV2FetchError(RuntimeError):
    """Too many consecutive content fetches failed: the endpoint is wrong or unreachable."""


@dataclasses.dataclass(frozen=True)
class StackV2Config:
    """Where the ids and the contents come from, and how contents are fetched.

    dataset / data_dir / hf_split: the hub ids dataset (e.g. data_dir="data/Python"), read with streaming.
    data_files: local parquet files in the ids schema instead of the hub (offline runs, tests).
    languages: keep only rows whose `language` is one of these (empty: all).
    endpoint_url: an S3-compatible endpoint instead of AWS (a mirror, or a test server).
    unsigned: anonymous requests; set False to sign with the usual AWS credentials (env, ~/.aws).
    max_workers: concurrent fetches. max_attempts / backoff_s: retries of a failed fetch, waiting
    backoff_s * 2**attempt. cache_dir: keep fetched objects (gzip) there and read them back next time.
    max_bytes: rows whose `length_bytes` is larger are not fetched (cleaning counts them too_large).
    skip_flagged: rows with `is_generated` or `is_vendor` set are not fetched (counted as generated).
    """

    dataset: str = "bigcode/the-stack-v2-dedup"
    data_dir: str | None = None
    hf_split: str = "train"
    data_files: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    bucket: str = "softwareheritage"
    key_prefix: str = "content/"
    endpoint_url: str | None = None
    region_name: str = "us-east-1"
    unsigned: bool = True
    max_workers: int = 16
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    max_attempts: int = 4
    backoff_s: float = 0.5
    max_consecutive_failures: int = 64
    cache_dir: str | None = None
    max_bytes: int = 1_000_000
    skip_flagged: bool = True
    hf_token: str | None = None

    def __post_init__(self):
        if self.max_workers < 1 or self.max_attempts < 1:
            raise ValueError(f"max_workers={self.max_workers} and max_attempts={self.max_attempts} must be >= 1")


def _explain_hub_error(config: StackV2Config, err: Exception) -> Exception:
    name = type(err).__name__
    text = str(err)
    gated = "gated" in text.lower() or name in ("GatedRepoError",)
    auth = name in ("LocalTokenNotFoundError", "HfHubHTTPError") and ("401" in text or "403" in text)
    if gated or auth or "401" in text or "403" in text:
        return StackV2AccessError(
            f"The Stack v2 ids dataset {config.dataset!r} refused access ({name}). It is a gated dataset: open "
            f"https://huggingface.co/datasets/{config.dataset}, accept its terms with your account, then log in "
            "(`huggingface-cli login`) or set HF_TOKEN (or StackV2Config.hf_token) to a token of that account. "
            "For an offline run, pass local parquet files in the ids schema as StackV2Config.data_files."
        )
    if name in ("RepositoryNotFoundError", "DatasetNotFoundError", "FileNotFoundError"):
        return StackV2AccessError(
            f"The ids dataset {config.dataset!r} (data_dir={config.data_dir!r}) or data files {config.data_files} "
            f"were not found ({name}: {text}). Check the names; gated datasets also look missing without a token."
        )
    return err


def _explain_s3_error(config: StackV2Config, err: Exception) -> StackV2AccessError:
    where = config.endpoint_url or "AWS S3"
    if isinstance(err, botocore.exceptions.NoCredentialsError):
        return StackV2AccessError(
            f"No AWS credentials found for signed requests to s3://{config.bucket} at {where}. Set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile in ~/.aws), or use unsigned=True."
        )
    code = err.response.get("Error", {}).get("Code", "?") if isinstance(err, botocore.exceptions.ClientError) else "?"
    hint = (
        "The bucket refused anonymous access: use unsigned=False with AWS credentials that Software Heritage "
        "granted access to." if config.unsigned else
        "Your AWS credentials were refused: check that they are valid and allowed to read this bucket."
    )
    return StackV2AccessError(f"s3://{config.bucket}/{config.key_prefix}... at {where} refused access ({code}). {hint}")


_ACCESS_CODES = frozenset({"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                           "ExpiredToken", "InvalidToken"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class ContentFetcher:
    """Fetches, caches and gunzips blob contents from an S3 bucket (thread-safe)."""

    def __init__(self, config: StackV2Config):
        self.config = config
        self._client = None
        self._lock = threading.Lock()
        self._consecutive_failures = 0
        self.attempts = 0  # requests made, retries included (for tests and logs)

    def client(self) -> botocore.client.BaseClient:
        """The S3 client, created on first use (unsigned when `config.unsigned`, one attempt per request: the
        retries with backoff are `fetch_compressed`'s) and shared by the threads."""
        with self._lock:
            if self._client is None:
                cfg = self.config
                session = boto3.session.Session()
                self._client = session.client(
                    "s3",
                    endpoint_url=cfg.endpoint_url,
                    region_name=cfg.region_name,
                    config=botocore.config.Config(
                        signature_version=botocore.UNSIGNED if cfg.unsigned else None,
                        connect_timeout=cfg.connect_timeout_s,
                        read_timeout=cfg.read_timeout_s,
                        retries={"max_attempts": 1, "mode": "standard"},  # retries are ours, with backoff
                        max_pool_connections=cfg.max_workers,
                    ),
                )
            return self._client

    def _cache_path(self, blob_id: str) -> pathlib.Path | None:
        if not self.config.cache_dir:
            return None
        return pathlib.Path(self.config.cache_dir) / blob_id[:2] / f"{blob_id}.gz"

    def fetch_compressed(self, blob_id: str) -> bytes | None:
        """The gzip object for `blob_id` (from the cache or the bucket), or None if the bucket has none."""
        cache = self._cache_path(blob_id)
        if cache is not None and cache.is_file():
            return cache.read_bytes()
        cfg = self.config
        last_error: Exception | None = None
        for attempt in range(cfg.max_attempts):
            if attempt:
                time.sleep(cfg.backoff_s * 2 ** (attempt - 1))
            with self._lock:
                self.attempts += 1
            try:
                response = self.client().get_object(Bucket=cfg.bucket, Key=cfg.key_prefix + blob_id)
                body = response["Body"].read()
            except botocore.exceptions.NoCredentialsError as err:
                raise _explain_s3_error(cfg, err) from err
            except botocore.exceptions.ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                if code in _ACCESS_CODES:
                    raise _explain_s3_error(cfg, err) from err
                if code in _MISSING_CODES:
                    self._record(ok=True)
                    return None
                last_error = err  # throttling, 5xx: retry
            except (botocore.exceptions.BotoCoreError, OSError) as err:
                last_error = err  # timeouts, refused connections, resets: retry
            else:
                self._record(ok=True)
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".tmp", delete=False) as handle:
                        handle.write(body)
                    os.replace(handle.name, cache)
                return body
        self._record(ok=False, error=last_error, blob_id=blob_id)
        return None

    def _record(self, ok: bool, error: Exception | None = None, blob_id: str = "") -> None:
        with self._lock:
            self._consecutive_failures = 0 if ok else self._consecutive_failures + 1
            failures = self._consecutive_failures
        if failures >= self.config.max_consecutive_failures:
            raise StackV2FetchError(
                f"{failures} content fetches in a row failed after {self.config.max_attempts} attempts each "
                f"(last: blob {blob_id!r}: {type(error).__name__}: {error}). Check endpoint_url="
                f"{self.config.endpoint_url!r}, bucket={self.config.bucket!r} and the network."
            )

    def fetch(self, blob_id: str) -> bytes | None:
        """The decompressed content of `blob_id`, or None when it is missing or could not be fetched."""
        compressed = self.fetch_compressed(blob_id)
        if compressed is None:
            return None
        try:
            return gzip.decompress(compressed)
        except (OSError, EOFError):
            return None


def _open_rows(config: StackV2Config, shard_index: int, shard_count: int, skip: int):
    import datasets
    from datasets.distributed import split_dataset_by_node

    try:
        if config.data_files:
            rows = datasets.load_dataset("parquet", data_files=list(config.data_files), split="train", streaming=True)
        else:
            rows = datasets.load_dataset(config.dataset, data_dir=config.data_dir, split=config.hf_split,
                                         streaming=True, token=config.hf_token or os.environ.get("HF_TOKEN"))
    except Exception as err:  # the hub raises many types; translate the ones a user can act on
        raise _explain_hub_error(config, err) from err
    if config.languages:
        wanted = frozenset(config.languages)
        rows = rows.filter(lambda row: row["language"] in wanted)
    if shard_count > 1:
        rows = split_dataset_by_node(rows, rank=shard_index, world_size=shard_count)
    if skip:
        rows = rows.skip(skip)
    return iter(rows)


class StackV2Dataset(grain.IterDataset):
    """Grain `IterDataset` of `RawFile`s from The Stack v2 (see the module docstring).

    split: keep only rows of this split (by `repo_name/path`). shard_index / shard_count: this process's
    disjoint part of the rows (`datasets.distributed.split_dataset_by_node`: whole files when they divide
    evenly, else every shard_count-th row).
    """

    def __init__(self, config: StackV2Config, *, split: str | None = None, split_config: SplitConfig = DEFAULT_SPLIT,
                 shard_index: int = 0, shard_count: int = 1):
        super().__init__()
        _check_split(split)
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
        self.config = config
        self.split = split
        self.split_config = split_config
        self.shard_index = shard_index
        self.shard_count = shard_count

    def __iter__(self) -> _StackV2Iterator:
        return _StackV2Iterator(self)

    def __str__(self) -> str:
        return f"StackV2Dataset(dataset={self.config.dataset!r}, files={len(self.config.data_files)})"


class _StackV2Iterator(grain.DatasetIterator):
    def __init__(self, dataset: StackV2Dataset):
        super().__init__()
        self._ds = dataset
        self._fetcher = ContentFetcher(dataset.config)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._rows = None
        self._rows_consumed = 0  # id rows read from the stream and handed on (state)
        self._window: collections.deque = collections.deque()  # (rows consumed after it, future of RawFile)
        self._rows_done = False

    def _raw_file(self, row: dict[str, Any]) -> RawFile:
        cfg = self._ds.config
        repo = row.get("repo_name") or ""
        path = row.get("path") or row.get("blob_id")
        key = f"{repo}/{path}" if repo else str(path)
        language = row.get("language") or ""
        declared = row.get("length_bytes")
        if cfg.skip_flagged and (row.get("is_generated") or row.get("is_vendor")):
            return RawFile(key=key, language=language, size=int(declared or 0), data=b"", repo=repo, generated=True)
        if declared is not None and int(declared) > cfg.max_bytes:
            return RawFile(key=key, language=language, size=int(declared), data=b"", repo=repo)
        data = self._fetcher.fetch(str(row["blob_id"]))
        if data is None:
            return RawFile(key=key, language=language, size=0, repo=repo)
        return RawFile(key=key, language=language, size=len(data), data=data[: cfg.max_bytes + 1],
                       encoding=row.get("src_encoding") or None, repo=repo)

    def _keep(self, row: dict[str, Any]) -> bool:
        if self._ds.split is None:
            return True
        key = f"{row.get('repo_name') or ''}/{row.get('path') or row.get('blob_id')}".lstrip("/")
        return split_of(key, self._ds.split_config) == self._ds.split

    def _fill(self) -> None:
        if self._rows is None:
            self._rows = _open_rows(self._ds.config, self._ds.shard_index, self._ds.shard_count,
                                    self._rows_consumed)
            self._pool = concurrent.futures.ThreadPoolExecutor(self._ds.config.max_workers,
                                                               thread_name_prefix="stack-v2-fetch")
        read = self._window[-1][0] if self._window else self._rows_consumed
        while not self._rows_done and len(self._window) < 2 * self._ds.config.max_workers:
            try:
                row = next(self._rows)
            except StopIteration:
                self._rows_done = True
                break
            except Exception as err:
                raise _explain_hub_error(self._ds.config, err) from err
            read += 1
            if self._keep(row):
                self._window.append((read, self._pool.submit(self._raw_file, row)))
            elif self._window:
                self._window[-1] = (read, self._window[-1][1])  # a filtered row counts with the kept one before it
            else:
                self._rows_consumed = read

    def __next__(self) -> RawFile:
        if not self._window:
            self._fill()
        if not self._window:
            raise StopIteration
        rows_after, future = self._window.popleft()
        record = future.result()
        self._rows_consumed = rows_after
        if len(self._window) < self._ds.config.max_workers:
            self._fill()
        return record

    def get_state(self) -> dict[str, Any]:
        return {"rows_consumed": self._rows_consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.close()
        self._rows_consumed = int(state["rows_consumed"])

    def close(self) -> None:
        for _, future in self._window:
            future.cancel()
        self._window.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None
        self._rows = None
        self._rows_done = False

    @property
    def fetch_attempts(self) -> int:
        return self._fetcher.attempts

    def __str__(self) -> str:
        return f"StackV2Iterator(rows_consumed={self._rows_consumed})"
