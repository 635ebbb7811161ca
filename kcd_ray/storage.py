"""One filesystem layer for everything kcd_ray keeps beside a run: local paths and object-store URIs alike.

A location is either a local path or a URI that pyarrow's filesystems understand (``s3://bucket/prefix``,
``gs://...``, ``hdfs://...``; https://arrow.apache.org/docs/python/filesystems.html). ``s3://`` builds an
``S3FileSystem`` from the usual environment: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN`` (else the AWS SDK's default chain: profile, instance role), ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, Ceph,
moto); ``KCD_RAY_S3_CONNECT_TIMEOUT`` (seconds, default 5). Other schemes go through ``FileSystem.from_uri``.

Writes are atomic: a local file is written beside its target and renamed (``os.replace``); an object store
gets one whole-object upload (S3 makes an object visible only once complete), so no reader ever sees half a
file. Objects cannot be appended to: a growing file (``metrics.jsonl``) is rewritten whole.

Filesystems travel to Train workers (:func:`export` / :func:`install`) and to Ray Data's Parquet reads
(``filesystem=``) as pickled objects (an ``S3FileSystem`` pickles its options, endpoint and explicit keys
included); code inside Ray Data map tasks (blend overlays) builds its own from the node's variables. No Ray here.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import urlparse

import pyarrow.fs as pafs

from kcd_ray.config import ConfigError

_INSTALLED: dict[str, pafs.FileSystem] = {}  # "scheme://bucket" -> filesystem handed over by another process
_BUILT: dict[tuple, pafs.FileSystem] = {}  # ("scheme://bucket", the AWS_* settings) -> filesystem built here
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "KCD_RAY_S3_CONNECT_TIMEOUT")


class StorageError(ConfigError):
    """A storage location that cannot be used (unreachable endpoint, missing bucket): one line naming the URI."""


def is_uri(path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path) -> Path:
    p = str(path)
    return Path(os.path.expanduser(p[len("file://"):] if p.startswith("file://") else p))


def absolute(path: str) -> str:
    """A URI as it is; a local path made absolute (``~`` expanded); "" stays ""."""
    return str(path) if not path or is_uri(path) else str(local_path(path).resolve())


def join(base: str, *parts: str) -> str:
    if not is_uri(base):
        return str(local_path(base).joinpath(*parts))
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])


_BAD_NAME = re.compile(r"[/\\\x00]|^\.\.?$")


def check_name(name: str, key: str = "run.name") -> str:
    """A run, sweep or trial name is one folder name, so that it stays inside its storage folder (a path or a URI
    alike). Refused in one line naming ``key``: '/', '\\', '.', '..', '~...', an absolute path, an empty name."""
    if not isinstance(name, str) or not name.strip() or _BAD_NAME.search(name) or name.startswith("~"):
        raise ConfigError(f"{key}: {name!r} is not a valid name; expected one folder name (no '/', '\\', '..' or "
                          "'~', not empty), so that it stays inside its storage folder")
    return name


def _root(uri: str) -> str:
    u = urlparse(uri)
    return f"{u.scheme}://{u.netloc}"


def _s3() -> pafs.S3FileSystem:
    env = os.environ
    kw: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else "https://" + endpoint)
        kw.update(endpoint_override=u.netloc, scheme=u.scheme)
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None)
    if region:
        kw["region"] = region
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        # explicit keys pickle with the filesystem (S3FileSystem.__reduce__ keeps every option, see
        # https://arrow.apache.org/docs/python/generated/pyarrow.fs.S3FileSystem.html), so Ray workers started
        # without these variables get them too
        kw.update(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                  session_token=env.get("AWS_SESSION_TOKEN") or None)
    # bounded: an unreachable endpoint is reported in seconds, not after the SDK's long default back-off
    kw.update(connect_timeout=float(env.get("KCD_RAY_S3_CONNECT_TIMEOUT", 5)),
              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
    return pafs.S3FileSystem(**kw)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a URI or local path."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).resolve())
    root = _root(uri)
    key = (root, tuple(os.environ.get(k) for k in _ENV))
    fs = _INSTALLED.get(root) or _BUILT.get(key)
    if fs is None:
        try:
            fs = _s3() if uri.startswith("s3://") else pafs.FileSystem.from_uri(uri)[0]
        except Exception as e:  # noqa: BLE001 - an unknown scheme or a bad URI
            raise StorageError(f"{uri}: no filesystem for this URI ({_short(e)})") from None
        _BUILT[key] = fs
    u = urlparse(uri)
    return fs, (u.netloc + u.path).rstrip("/")


def export(*uris: str) -> dict:
    """The filesystems of these URIs, to :func:`install` in another process (local paths need none)."""
    return {_root(u): filesystem(u)[0] for u in uris if u and is_uri(u)}


def install(filesystems: Optional[dict]) -> None:
    _INSTALLED.update(filesystems or {})


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def check(uri: str, what: str) -> None:
    """Fail now, in one line naming the URI, when the store cannot be reached or its bucket does not exist."""
    if not is_uri(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:  # a bucket's info is a HeadBucket: NotFound when it does not exist, an OSError when unreachable
        info = fs.get_file_info(bucket)
    except Exception as e:  # noqa: BLE001 - network, credentials, endpoint: all one line
        raise StorageError(f"{what}: {uri}: cannot reach the store ({_short(e)}); check AWS_ENDPOINT_URL, "
                           "AWS_REGION and the credentials") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what}: {uri}: bucket {bucket!r} does not exist (create it first)")


# --------------------------------------------------------------------------- files


def exists(uri) -> bool:
    fs, path = filesystem(str(uri))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri) -> bytes:
    if not is_uri(uri):
        return local_path(uri).read_bytes()
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: not found") from None


def read_text(uri) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri, data: bytes) -> None:
    """Atomic: a local file is written beside its target and renamed; an object is one PUT."""
    if not is_uri(uri):
        p = local_path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    fs, path = filesystem(uri)
    # An S3 object becomes visible only when its upload completes ("Amazon S3 never adds partial objects":
    # https://docs.aws.amazon.com/AmazonS3/latest/userguide/Welcome.html#ConsistencyModel); pyarrow's output
    # stream issues a PutObject, or completes its multipart upload, on close.
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri, text: str) -> None:
    write_bytes(uri, text.encode())


def upload(local: Path, uri: str) -> None:
    if not is_uri(uri):
        write_bytes(uri, Path(local).read_bytes())
        return
    fs, path = filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local: Path) -> None:
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{local.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:6]}")
    fs, path = filesystem(uri)
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    os.replace(tmp, local)


def fetch(uri: str) -> Path:
    """A local copy of one file in a store, at its :func:`stage_dir` path; downloaded again when the stored
    object's size or modification time differ from the copy's (a retrained teacher replaces its object)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: not found")
    local = stage_dir(uri)
    stamp = local.with_name(local.name + ".stamp")
    want = f"{info.size} {info.mtime_ns}"
    if not (local.is_file() and stamp.is_file() and stamp.read_text() == want):
        download(uri, local)
        write_text(stamp, want)
    return local


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_files(uri) -> list[str]:
    """Every file under ``uri`` (recursively), as sorted paths relative to it; [] when there is none."""
    fs, path = filesystem(str(uri))
    # allow_not_found: a prefix with no objects lists as empty instead of raising
    # (https://arrow.apache.org/docs/python/generated/pyarrow.fs.FileSelector.html)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def list_stats(uri) -> dict[str, tuple[int, int]]:
    """Every file under ``uri`` (recursively): relative path -> (size in bytes, modification time in ns, 0 where
    the store has none); {} when there is none. One listing."""
    fs, path = filesystem(str(uri))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {i.path[len(path):].lstrip("/"): (int(i.size), int(i.mtime_ns or 0)) for i in infos
            if i.type == pafs.FileType.File}


def list_sizes(uri) -> dict[str, int]:
    """Every file under ``uri`` (recursively): relative path -> size in bytes; {} when there is none."""
    return {rel: st[0] for rel, st in list_stats(uri).items()}


def open_input(uri):
    """A seekable file (``pyarrow.parquet.read_table`` / ``ParquetFile`` read it in place)."""
    fs, path = filesystem(str(uri))
    return fs.open_input_file(path)


def parquet_source(path) -> tuple[Optional[pafs.FileSystem], str]:
    """(filesystem, path) for ``ray.data.read_parquet(path, filesystem=...)``: a folder of a local working copy of
    a URI (:func:`stage_dir`, marked by ``STAGE_MARK``) is read from the store, so read tasks on any node find it."""
    p = Path(path)
    for folder, rel in ((p, ""), (p.parent, p.name)):
        uri = staged_from(folder)
        if uri:
            return filesystem(join(uri, rel))
    return None, str(p)


# --------------------------------------------------------------------------- local working copies

STAGE_MARK = ".kcd_ray_source"  # first line: the URI this local folder is a working copy of


def stage_dir(uri: str) -> Path:
    """The local working copy of a URI on this node: ``$KCD_RAY_STAGE`` (default ``<tmp>/kcd_ray-stage``)
    ``/<scheme>/<bucket>/<path>``; the same on every node, so driver and workers of one node share it."""
    u = urlparse(uri)
    return _stage_base() / u.scheme / u.netloc / u.path.strip("/")


def _stage_base() -> Path:
    return Path(os.environ.get("KCD_RAY_STAGE") or Path(tempfile.gettempdir()) / "kcd_ray-stage")


def stage_root(uri: str) -> tuple[str, str]:
    """(local folder, URI) of the bucket holding ``uri``'s working copy: maps any working-copy path back to a URI."""
    u = urlparse(uri)
    return str(_stage_base() / u.scheme / u.netloc), f"{u.scheme}://{u.netloc}"


def staged_from(folder, digest: bool = False):
    """The URI a local folder is a working copy of ('' for an ordinary folder); with ``digest``, (URI, the
    digest recorded with it)."""
    mark = Path(folder) / STAGE_MARK
    lines = (mark.read_text().splitlines() if mark.is_file() else []) + ["", ""]
    return (lines[0], lines[1]) if digest else lines[0]


def mark_staged(folder, uri: str, digest: str = "") -> None:
    write_text(Path(folder) / STAGE_MARK, f"{uri}\n{digest}\n")


def upload_tree(local: Path, uri: str, files: Optional[Iterable[str]] = None, last: Iterable[str] = ()) -> None:
    """Upload ``files`` (relative; default every file) under ``local`` to ``uri``; ``last`` go after the rest
    (the file whose presence says the folder is complete, such as a data set's meta.json)."""
    local = Path(local)
    rels = sorted(files) if files is not None else sorted(
        f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file() and f.name != STAGE_MARK)
    last = [r for r in last if r in rels]
    for rel in [r for r in rels if r not in last] + last:
        upload(local / rel, join(uri, rel))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
