"""Versioned model registry on a file system: atomic publish, promote, rollback, watch.

Layout under ``root``::

    root/<kind>/<version>/manifest.json   # written last; lists every file's sha256 and size
    root/<kind>/<version>/<files...>      # model files, index, feature list, ...
    root/<kind>/CURRENT                   # the current version's name, replaced with os.replace
    root/<kind>/HISTORY.jsonl             # one line per promotion or rollback
    root/<kind>/.tmp-<uuid>/              # a publish in progress (never listed)

A version is immutable once published. ``publish`` builds the version in a hidden
``.tmp-<uuid>`` directory, fsyncs every file and the manifest, then renames the directory
to its final name, which is atomic on POSIX: a reader either sees no version or a complete
one. Only then does ``CURRENT`` move (also atomically), so a reader that follows
``CURRENT`` never reaches a half-written version.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from models.errors import CorruptVersionError, ModelError, ModelNotFoundError
from tessera.logs import get_logger

__all__ = ["FileSource", "ModelRegistry", "RegistryWatcher", "VersionInfo"]

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
HISTORY = "HISTORY.jsonl"
MANIFEST_FORMAT = 1

#: What ``publish`` accepts for one file: its bytes, or a path to a file or a directory.
FileSource = Path | bytes

_TMP_PREFIX = ".tmp-"
_LOCK = ".lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_KEYS = ("format", "kind", "version", "created_at", "files", "sizes")
_CHUNK = 1 << 20

_log = get_logger("models.registry")


@dataclass(frozen=True)
class VersionInfo:
    """One complete, published version of a model kind.

    ``manifest`` holds the caller's manifest plus ``format``, ``kind``, ``version``,
    ``created_at`` (epoch ms), ``files`` (name -> sha256) and ``sizes`` (name -> bytes).
    """

    kind: str
    version: str
    path: Path
    manifest: dict[str, Any] = field(compare=False, repr=False)
    created_at: int

    @property
    def files(self) -> list[str]:
        """Return the names of the version's files (relative POSIX paths), sorted."""
        return sorted(self.manifest["files"])

    def file(self, name: str) -> Path:
        """Return the path of file ``name`` of this version.

        Raises:
            ModelError: the version has no file of that name (the message lists them).
        """
        if name not in self.manifest["files"]:
            raise ModelError(
                f"model {self.kind!r} version {self.version!r} has no file {name!r}; "
                f"files: {', '.join(self.files) or 'none'}"
            )
        return self.path / name


class ModelRegistry:
    """A registry of model versions under one root directory (see the module docstring).

    Safe for many readers and writers, in one process or many, on a local POSIX file
    system: publishes never collide (each builds in its own temporary directory), and
    promotions, rollbacks and pruning of one kind are serialized by a ``flock``.
    """

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time):
        """Open (not create) a registry at ``root``; ``clock`` returns epoch seconds."""
        self.root = Path(root)
        self._clock = clock

    # ------------------------------------------------------------------ write side

    def publish(
        self,
        kind: str,
        files: Mapping[str, FileSource],
        manifest: Mapping[str, Any],
        *,
        version: str | None = None,
        promote: bool = True,
    ) -> VersionInfo:
        """Publish a new version of ``kind`` atomically, and make it current if ``promote``.

        Args:
            kind: model kind, e.g. ``two_tower``; letters, digits, ``._-``.
            files: name -> bytes, or a ``Path`` to a file, or to a directory (copied
                recursively as ``name/<relative path>``). Names are relative POSIX paths.
            manifest: JSON-serializable metadata (feature list and order, training range,
                metrics, ...); the keys ``format, kind, version, created_at, files, sizes``
                are filled in by the registry.
            version: the version name; default ``v<UTC yyyymmddThhmmss>-<6 hex>``.
            promote: also point ``CURRENT`` at the new version.

        Returns:
            The published version.

        Raises:
            ModelError: a bad name, a reserved manifest key, a missing source file, a
                manifest that is not JSON, or a version that already exists.
        """
        _check_name("kind", kind)
        created_at = int(self._clock() * 1000)
        if version is None:
            version = _default_version(created_at)
        _check_name("version", version)
        reserved = sorted(set(manifest) & set(_RESERVED_KEYS))
        if reserved:
            raise ModelError(
                f"manifest keys {reserved} are reserved (the registry fills in "
                f"{', '.join(_RESERVED_KEYS)}); rename them"
            )
        entries = _expand_files(files)

        kind_dir = self.root / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        final = kind_dir / version
        if final.exists():
            raise self._exists_error(kind, version)
        tmp = kind_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            hashes: dict[str, str] = {}
            sizes: dict[str, int] = {}
            dirs = {tmp}
            for name, source in entries:
                dst = tmp / name
                dst.parent.mkdir(parents=True, exist_ok=True)
                dirs.update(tmp / parent for parent in PurePosixPath(name).parents)
                hashes[name], sizes[name] = _write_file(dst, source)
            full = {
                **manifest,
                "format": MANIFEST_FORMAT,
                "kind": kind,
                "version": version,
                "created_at": created_at,
                "files": hashes,
                "sizes": sizes,
            }
            try:
                text = json.dumps(full, indent=2, sort_keys=True)
            except (TypeError, ValueError) as exc:
                raise ModelError(f"manifest is not JSON-serializable: {exc}") from exc
            _write_file(tmp / MANIFEST, text.encode())  # last: its presence means complete
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)
            try:
                os.rename(tmp, final)  # atomic; fails if ``final`` appeared and is non-empty
            except OSError as exc:
                raise self._exists_error(kind, version) from exc
            _fsync_dir(kind_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        info = VersionInfo(kind, version, final, full, created_at)
        _log.info("model_published", kind=kind, version=version, files=len(hashes))
        if promote:
            with self._locked(kind):
                self._set_current(kind, version, action="promote", via="publish")
        return info

    def promote(self, kind: str, version: str) -> VersionInfo:
        """Make ``version`` current after verifying every file's hash; record it in HISTORY.

        Raises:
            ModelNotFoundError: no such kind or version.
            CorruptVersionError: the version's files do not match its manifest.
        """
        info = self.get(kind, version, verify=True)
        with self._locked(kind):
            self._set_current(kind, info.version, action="promote")
        return info

    def rollback(self, kind: str) -> VersionInfo:
        """Make the previously promoted version current again (walking HISTORY backwards).

        Each rollback steps one promotion back: after promoting A, B, C, rollbacks give B,
        then A. Versions pruned or corrupt since their promotion are skipped.

        Raises:
            ModelError: no earlier promoted version is left to roll back to.
        """
        self._require_kind(kind)
        with self._locked(kind):
            current = self.current_version(kind)
            stack = self._promotion_stack(kind)
            while stack and stack[-1] == current:
                stack.pop()
            skipped: list[str] = []
            while stack:
                candidate = stack[-1]
                try:
                    info = self.get(kind, candidate, verify=True)
                    break
                except ModelError:
                    skipped.append(stack.pop())
            else:
                also = f" (skipped missing or corrupt: {', '.join(skipped)})" if skipped else ""
                raise ModelError(
                    f"cannot roll back {kind!r}: no earlier promoted version in "
                    f"{self.root / kind / HISTORY}{also}; current is {current!r}; "
                    "promote a version explicitly with `tessera models promote`"
                )
            self._set_current(kind, info.version, action="rollback")
        return info

    def prune(self, kind: str, keep: int = 5, *, tmp_max_age_s: float = 3600.0) -> list[str]:
        """Delete all but the newest ``keep`` versions of ``kind``; never the current one.

        Also removes ``.tmp-*`` directories of publishes abandoned more than
        ``tmp_max_age_s`` ago. A version disappears atomically (renamed away, then
        deleted), but a reader still reading a pruned version's files may fail.

        Returns:
            The names of the versions deleted, oldest first.
        """
        if not isinstance(keep, int) or keep < 0:
            raise ModelError(f"keep must be an integer >= 0, got {keep!r}")
        kind_dir = self._require_kind(kind)
        removed: list[str] = []
        with self._locked(kind):
            current = self.current_version(kind)
            versions = [v.version for v in self.list(kind)]
            kept = set(versions[len(versions) - keep :] if keep else ())
            for name in versions:
                if name in kept or name == current:
                    continue
                trash = kind_dir / f"{_TMP_PREFIX}del-{uuid.uuid4().hex}"
                os.rename(kind_dir / name, trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(name)
            now = self._clock()
            for tmp in kind_dir.glob(f"{_TMP_PREFIX}*"):
                with contextlib.suppress(OSError):
                    if tmp.is_dir() and now - tmp.stat().st_mtime > tmp_max_age_s:
                        shutil.rmtree(tmp, ignore_errors=True)
            _fsync_dir(kind_dir)
        if removed:
            _log.info("model_versions_pruned", kind=kind, removed=removed, kept=keep)
        return removed

    # ------------------------------------------------------------------ read side

    def kinds(self) -> list[str]:
        """Return the model kinds in the registry, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.match(p.name))

    def list(self, kind: str | None = None) -> list[VersionInfo]:
        """Return the complete versions of ``kind`` (or of every kind), oldest first.

        A directory is listed only if its manifest is valid and every file it names exists
        with the recorded size; ``.tmp-*`` directories are never listed. Hashes are not
        checked here (see ``get(..., verify=True)``).
        """
        out: list[VersionInfo] = []
        for k in [kind] if kind is not None else self.kinds():
            kind_dir = self.root / k
            if not kind_dir.is_dir():
                continue
            for child in kind_dir.iterdir():
                if not _NAME_RE.match(child.name) or child.name == "current":
                    continue
                if not child.is_dir():
                    continue
                try:
                    out.append(self._load(k, child.name))
                except (CorruptVersionError, FileNotFoundError):
                    continue
        out.sort(key=lambda v: (v.created_at, v.kind, v.version))
        return out

    def current_version(self, kind: str) -> str | None:
        """Return the name in ``kind``'s CURRENT file, or None if nothing is current."""
        try:
            text = (self.root / kind / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def current(self, kind: str) -> VersionInfo | None:
        """Return the current version of ``kind``, or None if none was promoted.

        Raises:
            CorruptVersionError: CURRENT names a version that is missing or incomplete.
        """
        name = self.current_version(kind)
        if name is None:
            return None
        try:
            return self._load(kind, name)
        except FileNotFoundError as exc:
            raise CorruptVersionError(
                kind=kind, version=name, reason=f"CURRENT names it but {exc.filename} is missing"
            ) from exc

    def get(self, kind: str, version: str = "current", *, verify: bool = False) -> VersionInfo:
        """Return one version of ``kind`` (``"current"`` for the current one).

        Args:
            verify: also check every file's sha256 against the manifest (reads all bytes).

        Raises:
            ModelNotFoundError: no such kind, version, or no current version; the message
                lists what exists.
            CorruptVersionError: the version is incomplete, or (``verify``) a hash differs.
        """
        self._require_kind(kind)
        if version == "current":
            info = self.current(kind)
            if info is None:
                raise self._not_found(kind, version)
        else:
            try:
                info = self._load(kind, version)
            except FileNotFoundError as exc:
                raise self._not_found(kind, version) from exc
        if verify:
            self.verify(info)
        return info

    def verify(self, info: VersionInfo) -> None:
        """Check that every file of ``info`` exists and matches its recorded sha256 and size.

        Raises:
            CorruptVersionError: naming the first file that does not match.
        """
        for name in info.files:
            path = info.path / name
            try:
                digest, size = _hash_file(path)
            except FileNotFoundError as exc:
                raise CorruptVersionError(
                    kind=info.kind, version=info.version, reason=f"file {name!r} is missing"
                ) from exc
            if size != info.manifest["sizes"][name] or digest != info.manifest["files"][name]:
                raise CorruptVersionError(
                    kind=info.kind,
                    version=info.version,
                    reason=f"file {name!r} sha256 mismatch (manifest "
                    f"{info.manifest['files'][name][:12]}..., on disk {digest[:12]}...)",
                )

    def history(self, kind: str) -> list[dict[str, Any]]:
        """Return ``kind``'s HISTORY entries, oldest first (a torn last line is skipped)."""
        try:
            lines = (self.root / kind / HISTORY).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    # ------------------------------------------------------------------ internals

    def _load(self, kind: str, version: str) -> VersionInfo:
        """Read and check a version's manifest and file sizes (not hashes).

        Raises FileNotFoundError when the version directory or manifest does not exist.
        """
        _check_name("version", version)
        path = self.root / kind / version
        raw = (path / MANIFEST).read_bytes()

        def corrupt(reason: str) -> CorruptVersionError:
            return CorruptVersionError(kind=kind, version=version, reason=reason)

        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise corrupt(f"{MANIFEST} is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict):
            raise corrupt(f"{MANIFEST} is not a JSON object")
        files, sizes = manifest.get("files"), manifest.get("sizes")
        created_at = manifest.get("created_at")
        if manifest.get("kind") != kind or manifest.get("version") != version:
            raise corrupt(
                f"{MANIFEST} names {manifest.get('kind')!r}/{manifest.get('version')!r}, "
                f"not {kind!r}/{version!r}"
            )
        if not isinstance(created_at, int):
            raise corrupt(f"{MANIFEST}: created_at must be an integer, got {created_at!r}")
        if not isinstance(files, dict) or not isinstance(sizes, dict) or set(files) != set(sizes):
            raise corrupt(f"{MANIFEST}: 'files' and 'sizes' must map the same file names")
        for name, digest in files.items():
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise corrupt(f"{MANIFEST}: file {name!r} has no valid sha256")
            try:
                size = (path / name).stat().st_size
            except FileNotFoundError as exc:
                raise corrupt(f"file {name!r} is missing") from exc
            if size != sizes[name]:
                raise corrupt(f"file {name!r} has {size} bytes, manifest says {sizes[name]}")
        return VersionInfo(kind, version, path, manifest, created_at)

    def _set_current(
        self, kind: str, version: str, *, action: Literal["promote", "rollback"], via: str = ""
    ) -> None:
        """Point CURRENT at ``version`` atomically and append to HISTORY (hold the lock)."""
        kind_dir = self.root / kind
        previous = self.current_version(kind)
        tmp = kind_dir / f".CURRENT.{uuid.uuid4().hex}"
        _write_file(tmp, (version + "\n").encode())
        os.replace(tmp, kind_dir / CURRENT)
        _fsync_dir(kind_dir)
        entry: dict[str, Any] = {
            "ts": int(self._clock() * 1000),
            "action": action,
            "version": version,
            "previous": previous,
        }
        if via:
            entry["via"] = via
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        fd = os.open(kind_dir / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        _log.info(f"model_{action}d", kind=kind, version=version, previous=previous)

    def _promotion_stack(self, kind: str) -> list[str]:
        """Replay HISTORY: a promotion pushes; a rollback pops back down to its target."""
        stack: list[str] = []
        for entry in self.history(kind):
            version = entry.get("version")
            if not isinstance(version, str):
                continue
            if entry.get("action") == "promote":
                stack.append(version)
            elif entry.get("action") == "rollback":
                while stack and stack[-1] != version:
                    stack.pop()
                if not stack:
                    stack.append(version)
        return stack

    @contextlib.contextmanager
    def _locked(self, kind: str) -> Iterator[None]:
        kind_dir = self.root / kind
        kind_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(kind_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _require_kind(self, kind: str) -> Path:
        kind_dir = self.root / kind
        if not kind_dir.is_dir():
            raise ModelNotFoundError(root=str(self.root), kind=kind, kinds=self.kinds())
        return kind_dir

    def _not_found(self, kind: str, version: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            root=str(self.root),
            kind=kind,
            version=version,
            versions=[v.version for v in self.list(kind)],
            current=self.current_version(kind),
        )

    def _exists_error(self, kind: str, version: str) -> ModelError:
        return ModelError(
            f"model {kind!r} version {version!r} already exists in {self.root}; versions are "
            "immutable: publish under another version name (or omit it for a fresh one)"
        )


class RegistryWatcher:
    """Follow a kind's CURRENT and hand each new, verified version to ``on_change``.

    ``check`` reads CURRENT; when it names a version other than the active one, the
    version is loaded and every file's hash verified. A complete version is passed to
    ``on_change`` and becomes active; a broken one (missing file, hash mismatch, bad
    manifest), or one whose ``on_change`` raises, is refused: logged once, and the active
    version kept. A refused version is not retried until CURRENT names another one.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        kind: str,
        on_change: Callable[[VersionInfo], None],
        poll_s: float = 1.0,
    ):
        if not poll_s > 0:
            raise ModelError(f"poll_s must be > 0 seconds, got {poll_s!r}")
        self.registry = registry
        self.kind = kind
        self.poll_s = poll_s
        self._on_change = on_change
        self._active: VersionInfo | None = None
        self._refused: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = _log.bind(kind=kind)

    @property
    def active(self) -> VersionInfo | None:
        """Return the version last handed to ``on_change`` successfully, if any."""
        return self._active

    def check(self) -> VersionInfo | None:
        """Poll once; return the newly activated version, or None if nothing changed."""
        with self._lock:
            name = self.registry.current_version(self.kind)
            active = self._active.version if self._active else None
            if name is None or name == active:
                self._refused = None
                return None
            if name == self._refused:
                return None
            try:
                info = self.registry.get(self.kind, name, verify=True)
            except ModelError as exc:
                self._refused = name
                self._log.warning(
                    "model_version_refused", version=name, kept=active, reason=str(exc)
                )
                return None
            try:
                self._on_change(info)
            except Exception as exc:
                self._refused = name
                self._log.error(
                    "model_version_load_failed",
                    version=name,
                    kept=active,
                    reason=f"{type(exc).__name__}: {exc}",
                )
                return None
            self._active = info
            self._refused = None
            self._log.info("model_version_activated", version=name, previous=active)
            return info

    def start(self) -> None:
        """Check once now (in the caller's thread), then poll every ``poll_s`` in a daemon."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self.check()
        self._thread = threading.Thread(
            target=self._run, name=f"registry-watcher-{self.kind}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling and wait up to ``timeout_s`` for the thread to end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # keep watching: the next poll may succeed
                self._log.error("registry_watch_failed", reason=f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------- helpers


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == "current":
        raise ModelError(
            f"{what} {name!r} is not a valid name: use 1-128 letters, digits, '.', '_' or "
            f"'-', starting with a letter or digit (and not 'current')"
        )


def _default_version(created_at_ms: int) -> str:
    stamp = datetime.fromtimestamp(created_at_ms / 1000, tz=UTC).strftime("%Y%m%dT%H%M%S")
    return f"v{stamp}-{uuid.uuid4().hex[:6]}"


def _check_file_name(name: str) -> None:
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (
        not parts
        or name.startswith("/")
        or "\\" in name
        or any(p in (".", "..") or p.startswith(".") for p in parts)
        or name == MANIFEST
    ):
        raise ModelError(
            f"file name {name!r} is not allowed: use a relative POSIX path without '.', "
            f"'..' or hidden parts, other than {MANIFEST!r}"
        )


def _expand_files(files: Mapping[str, FileSource]) -> list[tuple[str, FileSource]]:
    """Check names and sources; expand directories into one entry per file."""
    out: dict[str, FileSource] = {}
    for name, source in files.items():
        _check_file_name(name)
        if name in out:
            raise ModelError(f"file {name!r} is given twice; pass it once")
        if isinstance(source, bytes | bytearray | memoryview):
            out[name] = bytes(source)
        elif isinstance(source, os.PathLike):
            path = Path(source)
            if path.is_dir():
                for f in sorted(p for p in path.rglob("*") if p.is_file()):
                    sub = f"{name}/{f.relative_to(path).as_posix()}"
                    _check_file_name(sub)
                    if sub in out:
                        raise ModelError(f"file {sub!r} is given twice; pass it once")
                    out[sub] = f
            elif path.is_file():
                out[name] = path
            else:
                raise ModelError(f"file {name!r}: source {path} does not exist")
        else:
            raise ModelError(
                f"file {name!r}: expected bytes or a Path, got {type(source).__name__} "
                "(wrap a path string in Path(...))"
            )
    for name in out:
        for parent in PurePosixPath(name).parents:
            if str(parent) in out:
                raise ModelError(f"file {str(parent)!r} is both a file and a directory")
    return sorted(out.items())


def _write_file(dst: Path, source: FileSource) -> tuple[str, int]:
    """Write ``source`` to a new file ``dst`` and fsync it; return (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    with open(dst, "xb") as out:
        if isinstance(source, bytes):
            out.write(source)
            digest.update(source)
            size = len(source)
        else:
            with open(source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size


def _hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
