"""The model registry: publish, list, get, promote, rollback, prune, the watcher, the CLI.

The concurrency test runs a reader in another process that polls ``current()`` and
``list()`` as fast as it can, reading and hashing every file, while this process publishes
20 versions of about 4 MB each. A negative control publishes the naive way (files written
in place, CURRENT moved first) to show the same reader does catch partial versions.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from models.errors import CorruptVersionError, ModelError, ModelNotFoundError
from models.registry import ModelRegistry, RegistryWatcher, VersionInfo
from tessera.cli import cli

KIND = "two_tower"


class FakeClock:
    """Epoch seconds that advance one second per call, so versions sort by publish order."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry", clock=FakeClock())


def _publish(registry: ModelRegistry, version: str, *, promote: bool = True, **manifest):
    return registry.publish(
        KIND,
        {"model.onnx": f"weights of {version}".encode(), "features.json": b'["a", "b"]'},
        {"metrics": {"auc": 0.75}, **manifest},
        version=version,
        promote=promote,
    )


# ---------------------------------------------------------------------- publish / read


def test_publish_writes_files_manifest_current_and_history(registry: ModelRegistry, tmp_path):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / "index.bin").write_bytes(b"\x00" * 1000)
    (index_dir / "ids.json").write_text('{"ids": []}')

    info = registry.publish(
        KIND,
        {"model.onnx": b"onnx bytes", "index": index_dir},
        {"feature_order": ["a", "b"], "training_range": ["2024-01-01", "2024-01-31"]},
    )

    assert re.fullmatch(r"v\d{8}T\d{6}-[0-9a-f]{6}", info.version)
    assert info.path == registry.root / KIND / info.version
    assert info.files == ["index/ids.json", "index/index.bin", "model.onnx"]
    assert info.file("model.onnx").read_bytes() == b"onnx bytes"
    assert info.file("index/index.bin").stat().st_size == 1000
    on_disk = json.loads((info.path / "manifest.json").read_text())
    assert on_disk == info.manifest
    assert on_disk["files"]["model.onnx"] == hashlib.sha256(b"onnx bytes").hexdigest()
    assert on_disk["sizes"]["index/index.bin"] == 1000
    assert on_disk["feature_order"] == ["a", "b"]
    assert on_disk["kind"] == KIND and on_disk["version"] == info.version
    assert on_disk["created_at"] == info.created_at
    assert (registry.root / KIND / "CURRENT").read_text().strip() == info.version
    assert registry.current(KIND) == info
    assert [e["action"] for e in registry.history(KIND)] == ["promote"]
    assert not list((registry.root / KIND).glob(".tmp-*"))
    with pytest.raises(ModelError, match="has no file 'nope'; files: index/ids.json"):
        info.file("nope")


def test_publish_without_promote_leaves_current(registry: ModelRegistry):
    a = _publish(registry, "a")
    _publish(registry, "b", promote=False)
    assert registry.current(KIND) == a
    assert [v.version for v in registry.list(KIND)] == ["a", "b"]
    assert registry.get(KIND, "b").version == "b"


def test_versions_are_immutable_and_names_checked(registry: ModelRegistry):
    _publish(registry, "a")
    with pytest.raises(ModelError, match="version 'a' already exists .* versions are immutable"):
        _publish(registry, "a")
    with pytest.raises(ModelError, match="version '../x' is not a valid name"):
        _publish(registry, "../x")
    with pytest.raises(ModelError, match=r"manifest keys \['files'\] are reserved"):
        registry.publish(KIND, {"m": b""}, {"files": {}}, version="b")
    with pytest.raises(ModelError, match="file name '../evil' is not allowed"):
        registry.publish(KIND, {"../evil": b""}, {}, version="c")
    with pytest.raises(ModelError, match="expected bytes or a Path, got str"):
        registry.publish(KIND, {"m": "model.onnx"}, {}, version="d")  # type: ignore[dict-item]
    with pytest.raises(ModelError, match="manifest is not JSON-serializable"):
        registry.publish(KIND, {"m": b""}, {"when": object()}, version="e")
    assert [v.version for v in registry.list(KIND)] == ["a"]
    assert not list((registry.root / KIND).glob(".tmp-*"))


def test_get_names_what_exists(registry: ModelRegistry):
    _publish(registry, "a")
    _publish(registry, "b", promote=False)
    with pytest.raises(ModelNotFoundError) as exc:
        registry.get(KIND, "zzz")
    assert str(exc.value) == (
        f"model 'two_tower' version 'zzz' not found in {registry.root}; "
        "versions: a, b (current: a); see `tessera models list`"
    )
    with pytest.raises(ModelNotFoundError) as exc:
        registry.get("ranker_l2")
    assert str(exc.value) == (
        f"no model kind 'ranker_l2' in registry {registry.root}; kinds: two_tower; "
        "publish a version first"
    )
    assert registry.get(KIND).version == "a"
    assert registry.current("ranker_l2") is None


def test_list_ignores_temporary_and_incomplete_directories(registry: ModelRegistry):
    _publish(registry, "a")
    kind_dir = registry.root / KIND
    (kind_dir / ".tmp-123").mkdir()
    (kind_dir / ".tmp-123" / "manifest.json").write_text("{}")
    (kind_dir / "no_manifest").mkdir()
    (kind_dir / "bad_json").mkdir()
    (kind_dir / "bad_json" / "manifest.json").write_text("{not json")
    b = _publish(registry, "b", promote=False)
    b.file("model.onnx").unlink()  # a missing file: not complete
    c = _publish(registry, "c", promote=False)
    c.file("model.onnx").write_bytes(b"truncated")  # wrong size: not complete
    assert [v.version for v in registry.list()] == ["a"]
    with pytest.raises(CorruptVersionError, match="'b' is corrupt: file 'model.onnx' is missing"):
        registry.get(KIND, "b")


def test_verify_catches_same_size_tampering(registry: ModelRegistry):
    a = _publish(registry, "a")
    data = bytearray(a.file("model.onnx").read_bytes())
    data[0] ^= 0xFF
    a.file("model.onnx").write_bytes(bytes(data))
    assert registry.get(KIND, "a").version == "a"  # sizes still match: cheap check passes
    with pytest.raises(CorruptVersionError, match="file 'model.onnx' sha256 mismatch"):
        registry.get(KIND, "a", verify=True)
    _publish(registry, "b")
    with pytest.raises(CorruptVersionError):
        registry.promote(KIND, "a")
    assert registry.current_version(KIND) == "b"


# ---------------------------------------------------------------------- promote / rollback / prune


def test_promote_and_rollback_walk_history(registry: ModelRegistry):
    for v in ("a", "b", "c"):
        _publish(registry, v)
    assert registry.rollback(KIND).version == "b"
    assert registry.rollback(KIND).version == "a"
    with pytest.raises(ModelError, match="cannot roll back 'two_tower': no earlier promoted"):
        registry.rollback(KIND)
    assert registry.current_version(KIND) == "a"

    assert registry.promote(KIND, "c").version == "c"
    assert registry.rollback(KIND).version == "a"
    actions = [(e["action"], e["version"], e["previous"]) for e in registry.history(KIND)]
    assert actions == [
        ("promote", "a", None),
        ("promote", "b", "a"),
        ("promote", "c", "b"),
        ("rollback", "b", "c"),
        ("rollback", "a", "b"),
        ("promote", "c", "a"),
        ("rollback", "a", "c"),
    ]


def test_rollback_skips_pruned_versions(registry: ModelRegistry):
    for v in ("a", "b", "c"):
        _publish(registry, v)
    import shutil

    shutil.rmtree(registry.root / KIND / "b")
    info = registry.rollback(KIND)
    assert info.version == "a"


def test_prune_keeps_newest_and_current(registry: ModelRegistry):
    _publish(registry, "a")
    for v in ("b", "c", "d", "e"):
        _publish(registry, v, promote=False)
    stale = registry.root / KIND / ".tmp-abandoned"
    stale.mkdir()
    os.utime(stale, (0, 0))
    assert registry.prune(KIND, keep=2) == ["b", "c"]
    assert [v.version for v in registry.list(KIND)] == ["a", "d", "e"]
    assert registry.current_version(KIND) == "a"
    assert not stale.exists()
    assert registry.prune(KIND, keep=0) == ["d", "e"]
    assert [v.version for v in registry.list(KIND)] == ["a"]
    with pytest.raises(ModelError, match="keep must be an integer >= 0, got -1"):
        registry.prune(KIND, keep=-1)


# ---------------------------------------------------------------------- readers during publish

_FILE_BYTES = 2 * 1024 * 1024


def _payload(version: int) -> dict[str, bytes]:
    rng = np.random.default_rng(version)
    return {
        "model.onnx": rng.bytes(_FILE_BYTES),
        "index/index.bin": rng.bytes(_FILE_BYTES),
        "features.json": json.dumps([f"f{i}" for i in range(version + 1)]).encode(),
    }


def _expected(files: dict[str, bytes]) -> dict[str, str]:
    """Hashes computed by the test itself, independent of the registry's bookkeeping."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def _problem(info: VersionInfo) -> str | None:
    """Return what is wrong with a version a reader was handed, or None if it is complete."""
    expected = info.manifest.get("expected")
    if not isinstance(expected, dict):
        return f"{info.version}: manifest has no 'expected'"
    if sorted(expected) != info.files:
        return f"{info.version}: files {info.files} != {sorted(expected)}"
    for name, digest in expected.items():
        try:
            data = (info.path / name).read_bytes()
        except OSError as exc:
            return f"{info.version}: {name}: {exc}"
        if hashlib.sha256(data).hexdigest() != digest:
            return f"{info.version}: {name}: {len(data)} bytes, content differs"
    return None


def _poll_reader(root: str, stop, ready, out) -> None:  # type: ignore[no-untyped-def]
    """Poll current() and list() until told to stop; report every observation."""
    registry = ModelRegistry(Path(root))
    checked: set[str] = set()
    seen_current: set[str] = set()
    polls = observations = 0
    partial: list[str] = []
    ready.set()
    while not stop.is_set():
        polls += 1
        try:
            current = registry.current(KIND)
        except (ModelError, OSError) as exc:
            partial.append(f"current(): {type(exc).__name__}: {exc}")
            current = None
        if current is not None:
            observations += 1
            seen_current.add(current.version)
            if problem := _problem(current):
                partial.append(f"current(): {problem}")
        try:
            listed = registry.list(KIND)
        except (ModelError, OSError) as exc:
            partial.append(f"list(): {type(exc).__name__}: {exc}")
            listed = []
        for info in listed:
            if info.version not in checked:
                observations += 1
                checked.add(info.version)
                if problem := _problem(info):
                    partial.append(f"list(): {problem}")
    out.put(
        {
            "polls": polls,
            "observations": observations,
            "seen_current": len(seen_current),
            "listed": len(checked),
            "partial": partial,
        }
    )


def _naive_publish(root: Path, version: str, files: dict[str, bytes], manifest: dict) -> None:
    """Publish in place, manifest and CURRENT first, files in chunks: NOT atomic."""
    final = root / KIND / version
    final.mkdir(parents=True)
    full = {
        **manifest,
        "format": 1,
        "kind": KIND,
        "version": version,
        "created_at": int(time.time() * 1000),
        "files": _expected(files),
        "sizes": {n: len(d) for n, d in files.items()},
    }
    (final / "manifest.json").write_text(json.dumps(full))
    (root / KIND / "CURRENT").write_text(version)
    for name, data in files.items():
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        with open(final / name, "wb") as f:
            for start in range(0, len(data), 256 * 1024):
                f.write(data[start : start + 256 * 1024])
                f.flush()
                time.sleep(0.002)  # a slow disk: the window a reader can fall into


def _run_with_reader(root: Path, publish_one) -> dict:  # type: ignore[no-untyped-def]
    ctx = mp.get_context("spawn")
    stop, ready, out = ctx.Event(), ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_poll_reader, args=(str(root), stop, ready, out), daemon=True)
    reader.start()
    try:
        assert ready.wait(60), "reader process did not start"
        for i in range(20):
            publish_one(i)
            time.sleep(0.01)  # let the reader see this version as current
        time.sleep(0.2)
        stop.set()
        report = out.get(timeout=60)
    finally:
        stop.set()
        reader.join(10)
        if reader.is_alive():
            reader.kill()
    return report


@pytest.mark.slow
def test_reader_during_publish_sees_only_complete_versions(tmp_path: Path):
    registry = ModelRegistry(tmp_path / "registry")

    def publish_one(i: int) -> None:
        files = _payload(i)
        registry.publish(KIND, files, {"expected": _expected(files)}, version=f"v{i:03d}")

    report = _run_with_reader(registry.root, publish_one)

    assert report["partial"] == []
    assert report["listed"] == 20
    assert report["seen_current"] >= 5, report  # the reader really raced the publisher
    assert report["polls"] > 20, report


@pytest.mark.slow
def test_reader_catches_a_non_atomic_publisher(tmp_path: Path):
    """Negative control: the same reader does see partial versions from a naive writer."""
    root = tmp_path / "registry"

    def publish_one(i: int) -> None:
        files = _payload(i)
        _naive_publish(root, f"v{i:03d}", files, {"expected": _expected(files)})

    report = _run_with_reader(root, publish_one)

    assert len(report["partial"]) > 0, report


# ---------------------------------------------------------------------- watcher


def test_watcher_follows_current_and_refuses_a_corrupt_version(registry: ModelRegistry):
    loaded: list[str] = []
    watcher = RegistryWatcher(registry, KIND, lambda info: loaded.append(info.version), 0.05)
    assert watcher.check() is None  # nothing published yet

    _publish(registry, "a")
    assert watcher.check().version == "a"  # type: ignore[union-attr]
    assert watcher.check() is None  # unchanged

    b = _publish(registry, "b")  # promoted, then tampered with after the fact
    b.file("model.onnx").write_bytes(b"X" * b.manifest["sizes"]["model.onnx"])
    assert registry.current_version(KIND) == "b"
    with capture_logs() as logs:
        assert watcher.check() is None
        assert watcher.check() is None  # refused once, not re-hashed every poll
    assert watcher.active is not None and watcher.active.version == "a"
    assert loaded == ["a"]
    refused = [e for e in logs if e["event"] == "model_version_refused"]
    assert len(refused) == 1
    assert refused[0]["version"] == "b" and refused[0]["kept"] == "a"
    assert "sha256 mismatch" in refused[0]["reason"]

    _publish(registry, "c")
    assert watcher.check().version == "c"  # type: ignore[union-attr]
    assert loaded == ["a", "c"]


def test_watcher_refuses_missing_file_bad_manifest_and_failed_load(registry: ModelRegistry):
    loaded: list[str] = []

    def on_change(info: VersionInfo) -> None:
        if info.version == "boom":
            raise RuntimeError("onnx session failed")
        loaded.append(info.version)

    watcher = RegistryWatcher(registry, KIND, on_change)
    _publish(registry, "a")
    watcher.check()
    b = _publish(registry, "b")
    b.file("features.json").unlink()
    c = _publish(registry, "c", promote=False)
    (c.path / "manifest.json").write_text("{")
    _publish(registry, "boom")
    with capture_logs() as logs:
        assert watcher.check() is None  # boom: on_change raised
        (registry.root / KIND / "CURRENT").write_text("b\n")
        assert watcher.check() is None
        (registry.root / KIND / "CURRENT").write_text("c\n")
        assert watcher.check() is None
    assert loaded == ["a"] and watcher.active.version == "a"  # type: ignore[union-attr]
    assert [(e["event"], e["version"]) for e in logs] == [
        ("model_version_load_failed", "boom"),
        ("model_version_refused", "b"),
        ("model_version_refused", "c"),
    ]
    assert "file 'features.json' is missing" in logs[1]["reason"]
    assert "not valid JSON" in logs[2]["reason"]


def test_watcher_thread_picks_up_a_promotion(registry: ModelRegistry):
    _publish(registry, "a")
    _publish(registry, "b", promote=False)
    loaded: list[str] = []
    watcher = RegistryWatcher(registry, KIND, lambda info: loaded.append(info.version), 0.02)
    watcher.start()
    try:
        assert loaded == ["a"]  # start() checks once before returning
        registry.promote(KIND, "b")
        deadline = time.monotonic() + 10
        while loaded != ["a", "b"] and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert loaded == ["a", "b"]


# ---------------------------------------------------------------------- CLI


def test_cli_list_show_promote_rollback(registry: ModelRegistry):
    _publish(registry, "a")
    _publish(registry, "b")
    runner = CliRunner()
    reg = ["--registry", str(registry.root)]

    result = runner.invoke(cli, ["models", "list", *reg])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["kind", "version", "created", "current", "metrics"]
    assert lines[1].split()[:2] == [KIND, "a"] and "*" not in lines[1]
    assert lines[2].split()[:2] == [KIND, "b"] and " * " in lines[2]
    assert lines[2].endswith("auc=0.75")

    result = runner.invoke(cli, ["models", "rollback", KIND, *reg])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "rolled back two_tower to a (was b)"

    result = runner.invoke(cli, ["models", "show", KIND, *reg])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["version"] == "a"

    result = runner.invoke(cli, ["models", "promote", KIND, "b", *reg])
    assert result.output.strip() == "promoted two_tower b (was a)"

    result = runner.invoke(cli, ["models", "promote", KIND, "zzz", *reg])
    assert result.exit_code == 1
    assert "Error: model 'two_tower' version 'zzz' not found" in result.output

    result = runner.invoke(cli, ["models", "list", "--kind", "ranker", *reg])
    assert result.output.strip() == f"no model versions of kind 'ranker' in {registry.root}"
