"""Run and sweep folders on object storage: `output_dir: s3://bucket/prefix` (or gs://, file://).

A run (and a sweep) still writes into a local staging folder, exactly as it does on a local
`output_dir`; this module mirrors that folder to the URI and back, through pyarrow's file
systems (the ones Ray Train's `storage_path` uses):

    check_writable(uri)        the preflight, before Ray starts: the file system resolves, the
                               credentials are there, a probe object is written and deleted
    pull_run(uri, local)       a run's files and its newest complete checkpoint, into staging
    push_run(local, uri, keep) the run's changed files, its new checkpoints, manifest last
    sync_trials(local, uri)    a sweep's trial folders both ways, checkpoints left on the URI: the
                               trials write theirs on the URI from whichever node runs them, the
                               driver its markers (stopped.json, error.json) and planned configs
    push_sweep(local, uri)     sync_trials, then the sweep's own plan, tables and report
    Mirror(local, uri)         push_sweep every 30 s while a sweep runs, and once more at its end
    download_dir / upload_dir  a whole folder, checkpoint manifests uploaded last
    pull_sweep(uri, local)     a sweep folder, less every trial's checkpoints (a trial fetches its own)
    pull_checkpoint(uri, dir)  one checkpoint and its run's files, for evaluate.py

A checkpoint on the URI keeps the local promise (peerlab.train.checkpoint): its files are
uploaded first and its `checkpoint.json` last, so a reader that finds the manifest finds every
file it lists; a checkpoint pruned locally loses its manifest first on the URI. What is read
back is checked against the manifest's hashes before it is used.

Credentials and endpoints come from the environment as boto and the AWS CLI read them
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or a profile, AWS_REGION,
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for an S3-compatible server); for gs://,
GOOGLE_APPLICATION_CREDENTIALS. Never from the YAML. Any failure is a StorageError whose
message is one line naming the URI.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

MANIFEST = "checkpoint.json"  # peerlab.train.checkpoint.MANIFEST (not imported: this module loads no torch)
SCHEMES = ("s3", "gs", "gcs", "file")  # what output_dir and resume_from_checkpoint may name
SKIPPED = (".ray",)
# What the workers of a cluster this driver starts get from its environment (peerlab.train.worker.environment).
ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
)  # Ray's own experiment state stays in the local staging folder


log = logging.getLogger("peerlab.storage")


class StorageError(ValueError):
    """A URI that cannot be used: one line naming it."""


def scheme(uri: str) -> str | None:
    """The URI's scheme (`s3`), or None for a plain local path."""
    text = str(uri)
    if "://" not in text:
        return None
    return text.split("://", 1)[0].lower()


def is_remote(uri) -> bool:
    """A URI that names object storage (s3://, gs://); file:// and plain paths are local."""
    return scheme(str(uri)) not in (None, "file")


def check_scheme(uri: str) -> None:
    """StorageError unless the URI is a local path or has a scheme a file system here handles."""
    s = scheme(uri)
    if s is not None and s not in SCHEMES:
        raise StorageError(f"{uri}: no file system handles the scheme {s}:// (use s3://, gs://, file:// or a path)")


def local_path(uri: str) -> Path:
    """The local path of a file:// URI or a plain path."""
    text = str(uri)
    return Path(urlparse(text).path) if scheme(text) == "file" else Path(text)


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended (a URI stays a URI: pathlib would turn s3:// into s3:/)."""
    if not is_remote(uri):
        return str(local_path(uri).joinpath(*parts))
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str, attempts: int | None = None):
    """(pyarrow file system, path inside it) for a remote URI; StorageError with one line if none fits.

    S3 is configured from the environment (endpoint override as boto reads it); `attempts` caps
    the retries of each request (the preflight fails fast on an unreachable endpoint).
    """
    import pyarrow.fs as pafs

    check_scheme(uri)
    s = scheme(uri)
    try:
        if s == "s3":
            parsed = urlparse(str(uri))
            options: dict = {}
            endpoint = _endpoint()
            if endpoint and "://" in endpoint:
                host = urlparse(endpoint)
                options.update(endpoint_override=host.netloc, scheme=host.scheme)
            elif endpoint:
                options["endpoint_override"] = endpoint
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if not region and not endpoint:  # AWS itself: the bucket's region, as FileSystem.from_uri finds it
                region = _bucket_region(parsed.netloc)
            if region:
                options["region"] = region
            if attempts:
                options.update(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), connect_timeout=5)
            fs = pafs.S3FileSystem(**options)
            return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
        if s in ("gs", "gcs") and attempts:  # the preflight: no endless retries to get a token or reach the API
            import datetime

            parsed = urlparse(str(uri))
            fs = pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=10))
            return fs, f"{parsed.netloc}{parsed.path}".rstrip("/")
        fs, path = pafs.FileSystem.from_uri(str(uri))
        return fs, path.rstrip("/")
    except Exception as err:
        raise StorageError(f"{uri}: {_reason(err)}") from None


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    import pyarrow.fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except Exception:  # unknown here: the SDK's default region, and the request says what is wrong
        return None


def _reason(err: Exception) -> str:
    """The first line of an error from pyarrow or the AWS SDK, shortened."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", lines[0]) if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _credentials_missing(uri: str) -> bool:
    """No S3 credentials where boto would look (the AWS SDK would then send unsigned requests)."""
    if scheme(uri) != "s3":
        return False
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return False
    try:
        import botocore.session

        return botocore.session.get_session().get_credentials() is None  # profiles, SSO, web identity, IMDS ...
    except ImportError:
        keys = ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
        keys += ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",)
        files = env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials")
        return not any(env.get(k) for k in keys) and not Path(files).expanduser().is_file()


def check_writable(uri: str) -> None:
    """The preflight: the URI's file system resolves, credentials are there, a probe object can be
    written, read back and deleted under it. StorageError (one line naming the URI) otherwise."""
    check_scheme(uri)
    if not is_remote(uri):
        return
    if _credentials_missing(uri):
        raise StorageError(
            f"{uri}: no S3 credentials in the environment (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE)"
        )
    fs, path = filesystem(uri, attempts=2)
    probe = f"{path}/.peerlab-probe-{os.getpid()}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"peerlab")
        with fs.open_input_stream(probe) as f:
            f.read()
        fs.delete_file(probe)
    except Exception as err:
        raise StorageError(f"{uri} cannot be written: {_reason(err)}") from None


# --------------------------------------------------------------------------------------
# Files and folders
# --------------------------------------------------------------------------------------


def _remote_stamps(uri: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, modification time in ns)} of every file under the URI."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except Exception as err:
        raise StorageError(f"{uri} cannot be listed: {_reason(err)}") from None
    return {i.path[len(path) + 1 :]: (i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File}


def _files(uri: str) -> dict[str, int]:
    """{relative path: size} of every file under the URI (none when it does not exist)."""
    return {name: size for name, (size, _) in _remote_stamps(uri).items()}


def list_files(uri: str) -> list[str]:
    """The relative paths of every file under `uri`, sorted."""
    if not is_remote(uri):
        root = local_path(uri)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    return sorted(_files(uri))


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return local_path(uri).exists()
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as err:
        raise StorageError(f"{uri}: {_reason(err)}") from None


def write_bytes(uri: str, data: bytes) -> None:
    if not is_remote(uri):
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return
    fs, path = filesystem(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except Exception as err:
        raise StorageError(f"{uri} cannot be written: {_reason(err)}") from None


def read_bytes(uri: str) -> bytes:
    if not is_remote(uri):
        return local_path(uri).read_bytes()
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as err:
        raise StorageError(f"{uri} cannot be read: {_reason(err)}") from None


def read_safetensors_header(uri: str) -> dict:
    """The JSON header of a safetensors file (a path or a URI), read from one open stream without the tensors:
    a little-endian u64 length, then that many bytes of JSON."""

    def read(f) -> dict:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))

    if not is_remote(uri):
        with open(local_path(uri), "rb") as f:
            return read(f)
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return read(f)
    except Exception as err:
        raise StorageError(f"{uri} cannot be read: {_reason(err)}") from None


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
    except Exception as err:
        raise StorageError(f"{uri} cannot be deleted: {_reason(err)}") from None


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    except Exception as err:
        raise StorageError(f"{uri} cannot be written: {_reason(err)}") from None


def _download(uri: str, local: Path) -> None:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except Exception as err:
        raise StorageError(f"{uri} cannot be read: {_reason(err)}") from None


def _manifest_last(names) -> list[str]:
    """Files in upload order: every checkpoint's manifest after all other files."""
    return sorted(names, key=lambda n: (Path(n).name == MANIFEST, n))


def _skipped(relative: str) -> bool:
    parts = Path(relative).parts
    return bool(parts) and (parts[0] in SKIPPED or any(p.endswith(".tmp") for p in parts))


def upload_dir(local: Path, uri: str) -> list[str]:
    """Upload every file under `local` to `uri` (Ray's .ray state and unfinished .tmp folders left out),
    each checkpoint's manifest after its other files. Returns the relative paths uploaded."""
    local = Path(local)
    names = [str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()]
    names = _manifest_last(n for n in names if not _skipped(n))
    for name in names:
        _upload(local / name, join(uri, name))
    return names


def download_dir(uri: str, local: Path) -> list[str]:
    """Download every file under `uri` into `local`; returns the relative paths."""
    names = [n for n in list_files(uri) if not _skipped(n)]
    for name in names:
        _download(join(uri, name), Path(local) / name)
    return names


def pull_sweep(uri: str, local: Path, plan_only: bool = False) -> list[str]:
    """A sweep folder from the URI into staging, for the same command or --resume to continue it: the
    sweep's own files, and its trial folders without their checkpoints (a trial that runs again fetches
    its own newest checkpoint, on its node). `plan_only`: the sweep's own top-level files alone (a dry
    run). Returns what came."""
    names = [n for n in list_files(uri) if not _skipped(n) and Path(n).parts[0] != "trials"]
    names = [n for n in names if len(Path(n).parts) == 1 or not plan_only]
    for name in names:
        _download(join(uri, name), Path(local) / name)
    if not plan_only:
        names += [f"trials/{n}" for n in sync_trials(local, uri)]
    return names


_synced: dict[str, dict[str, tuple]] = {}  # sweep staging folder -> {trials/ path: (local stamp, remote stamp)}


def _trial_file(relative: str) -> bool:
    """A file of trials/<id>/ that sync_trials carries: not a checkpoint's, not Ray's state, not a .tmp."""
    parts = Path(relative).parts
    return len(parts) >= 2 and "checkpoints" not in parts[1:2] and not _skipped(relative)


def _local_stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns


def sync_trials(local: Path, uri: str) -> list[str]:
    """Carry a sweep's trials/ folder both ways between staging and the URI, checkpoints left out.

    The trials write their run folders on the URI (from whichever node runs them); the driver
    writes markers (stopped.json, error.json), removes them when a trial runs again, and writes
    the planned configs. A file created, changed or removed on one side since the last sync is
    so on the other; changed on both sides, the newer wins. Returns the paths that came down.
    """
    import pyarrow.fs as pafs

    here_root, there_root = Path(local) / "trials", join(uri, "trials")
    state = _synced.setdefault(str(Path(local).resolve()), {})
    here = {
        str(p.relative_to(here_root)): _local_stamp(p) for p in here_root.rglob("*") if p.is_file()
    } if here_root.is_dir() else {}  # fmt: skip
    here = {k: v for k, v in here.items() if _trial_file(k) and v is not None}
    there = {k: v for k, v in _remote_stamps(there_root).items() if _trial_file(k)}
    pulled = []
    for name in sorted(set(here) | set(there) | set(state)):
        mine, theirs = here.get(name), there.get(name)
        was_mine, was_theirs = state.get(name, (None, None))
        if mine == was_mine and theirs == was_theirs:
            continue
        if mine != was_mine and theirs != was_theirs:  # both changed: the newer wins (a removal loses)
            push = mine is not None and (theirs is None or mine[1] >= theirs[1])
        else:
            push = mine != was_mine
        path, target = here_root / name, join(there_root, name)
        if push and mine is None:
            delete(target)
            theirs = None
        elif push:
            _upload(path, target)
            fs, inside = filesystem(target)
            info = fs.get_file_info(inside)
            theirs = (info.size, info.mtime_ns or 0) if info.type == pafs.FileType.File else None
        elif theirs is None:
            path.unlink(missing_ok=True)
            mine = None
        else:
            _download(target, path)
            mine = _local_stamp(path)
            pulled.append(name)
        if mine is None and theirs is None:
            state.pop(name, None)
        else:
            state[name] = (mine, theirs)
    return pulled


# --------------------------------------------------------------------------------------
# Run folders: staging <-> URI
# --------------------------------------------------------------------------------------


def remote_checkpoints(uri: str) -> dict[str, list[str]]:
    """{checkpoint folder name: its files} of a run's checkpoints/ (a URI or a path), complete or not."""
    found: dict[str, list[str]] = {}
    for name in list_files(join(uri, "checkpoints")):
        parts = Path(name).parts
        if len(parts) == 2 and parts[0].startswith("step-"):
            found.setdefault(parts[0], []).append(parts[1])
    return found


def complete_checkpoints(uri: str) -> list[str]:
    """The names (step-N) of a run's checkpoints whose manifest is written, oldest first: a path or a URI."""
    return _complete(remote_checkpoints(uri))


def _complete(found: dict[str, list[str]]) -> list[str]:
    """Of the checkpoints in `found` (name: its files), those whose manifest is written, oldest first."""
    return sorted(name for name, files in found.items() if MANIFEST in files and not name.endswith(".tmp"))


def fetch_checkpoint(uri: str, local: Path) -> Path | None:
    """The newest complete checkpoint under a run's checkpoints/ on the URI (or the checkpoint `uri`
    names), downloaded into `local/<step-N>` and checked against its manifest; None when there is none.

    A checkpoint without its manifest is not complete and is skipped, and so is one whose files do
    not match the manifest's hashes.
    """
    from peerlab.train import checkpoint as ckpt

    name = str(uri).rstrip("/").rsplit("/", 1)[-1]
    if exists(join(uri, MANIFEST)):
        candidates = {name: ["."]}
        base = str(uri).rstrip("/").rsplit("/", 1)[0]
    else:
        candidates = dict.fromkeys(complete_checkpoints(uri))
        base = join(uri, "checkpoints")
    for folder in sorted(candidates, reverse=True):
        target = Path(local) / folder
        if target.exists():
            shutil.rmtree(target)
        download_dir(join(base, folder), target)
        try:
            ckpt.verify(target)
            return target
        except (ckpt.CheckpointError, ValueError, KeyError):
            shutil.rmtree(target, ignore_errors=True)
    return None


def pull_run(uri: str, local: Path) -> Path | None:
    """A run folder's files from the URI into staging: everything but checkpoints/, and its newest
    complete checkpoint. Returns that checkpoint's local folder (None: the run has none)."""
    local = Path(local)
    for name in list_files(uri):
        if Path(name).parts[0] != "checkpoints" and not _skipped(name):
            _download(join(uri, name), local / name)
    newest = fetch_checkpoint(uri, local / "checkpoints")
    _pushed.pop(str(local.resolve()), None)
    if newest is not None:  # what came from the URI need not go back
        _pushed[str(local.resolve())] = {f"checkpoints/{newest.name}": (0, 0)}
    return newest


def pull_checkpoint(uri: str, staging: Path) -> tuple[str, Path]:
    """For a reader of one checkpoint on the URI (evaluate.py): the run's files and the checkpoint the URI
    names (a checkpoint, a run's checkpoints/ folder or a run: its newest complete one), into `staging`.
    Returns (the run's URI, the local path that names the same checkpoint); StorageError if there is none."""
    uri = str(uri).rstrip("/")
    name = uri.rsplit("/", 1)[-1]
    run_uri = (
        uri.rsplit("/", 2)[0] if name.startswith("step-") else uri.rsplit("/", 1)[0] if name == "checkpoints" else uri
    )
    local = Path(staging) / run_uri.rsplit("/", 1)[-1]
    for file in list_files(run_uri):
        if Path(file).parts[0] != "checkpoints" and not _skipped(file):
            _download(join(run_uri, file), local / file)
    found = fetch_checkpoint(uri if name.startswith("step-") else run_uri, local / "checkpoints")
    if found is None:
        raise StorageError(f"{uri} holds no complete checkpoint (none with its {MANIFEST} and matching files)")
    return run_uri, found if name.startswith("step-") else local


_pushed: dict[str, dict[str, tuple[int, int]]] = {}  # staging folder -> {relative path: (size, mtime) uploaded}


def push_run(local: Path, uri: str, keep: int) -> None:
    """Mirror a run's staging folder to the URI: first the files that changed since the last push (the
    metrics through the newest checkpoint's step among them), then each complete checkpoint the URI lacks
    (or holds another version of) file by file with its manifest last; then the URI keeps the newest `keep`
    complete checkpoints of the two places together (save_total_limit: staging holds only those written
    since the pull, and the newest it pulled) and loses the rest, manifest first, with any unfinished one
    older than the newest. So a reader that finds checkpoint N's manifest finds the run's lines up to step
    N too (a run resumed from it loses none)."""
    local = Path(local)
    _push_files(local, uri, leave_out="checkpoints")
    seen = _pushed.setdefault(str(local.resolve()), {})
    checkpoints = local / "checkpoints"
    complete = complete_checkpoints(str(local))
    there = remote_checkpoints(uri)
    for name in complete:
        key = f"checkpoints/{name}"
        if key in seen:
            continue
        manifest = (checkpoints / name / MANIFEST).read_bytes()
        if MANIFEST in there.get(name, []):
            if read_bytes(join(uri, key, MANIFEST)) == manifest:  # already there (an earlier process pushed it)
                seen[key] = (0, 0)
                continue
            delete(join(uri, key, MANIFEST))  # another checkpoint of that step: incomplete until replaced
        upload_dir(checkpoints / name, join(uri, key))
        seen[key] = (0, 0)
    finished = set(_complete(there))
    kept = set(sorted(finished | set(complete))[-keep:])
    for name, files in there.items():
        if name in complete:
            continue
        if name in finished:  # complete there: gone beyond the newest `keep`
            gone = name not in kept
        else:  # unfinished (an interrupted upload): gone once a newer checkpoint is complete
            gone = bool(complete) and name < complete[-1]
        if gone:
            for file in _manifest_last(files)[::-1]:  # manifest first
                delete(join(uri, "checkpoints", name, file))
            seen.pop(f"checkpoints/{name}", None)


def push_sweep(local: Path, uri: str) -> None:
    """Mirror a sweep's staging folder to the URI: its trial folders both ways (`sync_trials`), then the
    sweep's own files (plan, tables, report)."""
    sync_trials(local, uri)
    _push_files(local, uri, leave_out="trials")


def _push_files(local: Path, uri: str, leave_out: str) -> None:
    """Upload the files under `local` that changed since this process last pushed them (by size and
    modification time), except those under the folder `leave_out` and Ray's state."""
    seen = _pushed.setdefault(str(Path(local).resolve()), {})
    for path in sorted(Path(local).rglob("*")):
        relative = str(path.relative_to(local))
        if not path.is_file() or Path(relative).parts[0] == leave_out or _skipped(relative):
            continue
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
        if seen.get(relative) != stamp:
            _upload(path, join(uri, relative))
            seen[relative] = stamp


class Mirror(threading.Thread):
    """Pushes a staging folder to its URI every `every` seconds while a sweep runs (`push`: push_sweep);
    `close()` stops it and pushes a last time; `now()` pushes at once (the driver, before it reads the trials'
    markers). A push that fails while running is logged and tried again."""

    def __init__(self, local: Path, uri: str, push=None, every: float = 30.0):
        super().__init__(daemon=True)
        self.local, self.uri, self.push, self.every = Path(local), uri, push or push_sweep, every
        self.stop, self.lock = threading.Event(), threading.Lock()

    def now(self) -> None:
        with self.lock:
            self.push(self.local, self.uri)

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                self.now()
            except (StorageError, OSError) as err:  # a file pruned while it went up, the network: next round
                log.warning("mirroring %s to %s: %s (tried again in %.0f s)", self.local, self.uri, err, self.every)

    def close(self) -> None:
        self.stop.set()
        if self.is_alive():
            self.join()
        self.now()
