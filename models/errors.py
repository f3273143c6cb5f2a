"""Exceptions of the models package (registry, index); each message says how to fix it."""

from __future__ import annotations

from collections.abc import Sequence

from features.errors import TesseraError

__all__ = ["CorruptVersionError", "ModelError", "ModelNotFoundError", "RuntimeInstallError",
           "TesseraError"]


class ModelError(TesseraError):
    """A model, its registry or its index was used in a way that cannot work."""


class RuntimeInstallError(ModelError):
    """ONNX Runtime is installed in a way serving cannot use (both CPU and GPU builds, or no
    CUDA provider for ``device="cuda"``); the message says what to install."""


class ModelNotFoundError(ModelError, LookupError):
    """A model kind or version is not in the registry.

    The message names what was asked for and what exists, e.g.
    ``model 'ranker' version 'v9' not found in /reg; versions: v1, v2 (current: v2)``.
    """

    def __init__(
        self,
        *,
        root: str,
        kind: str,
        version: str | None = None,
        kinds: Sequence[str] = (),
        versions: Sequence[str] = (),
        current: str | None = None,
    ):
        self.root = root
        self.kind = kind
        self.version = version
        self.kinds = tuple(kinds)
        self.versions = tuple(versions)
        self.current = current
        if version is None:
            have = ", ".join(self.kinds) if self.kinds else "none"
            msg = (
                f"no model kind {kind!r} in registry {root}; kinds: {have}; publish a version first"
            )
        elif not self.versions:
            msg = (
                f"model {kind!r} version {version!r} not found in {root}; "
                f"kind {kind!r} has no complete versions; publish one first"
            )
        else:
            cur = f" (current: {current})" if current else " (none current)"
            msg = (
                f"model {kind!r} version {version!r} not found in {root}; "
                f"versions: {', '.join(self.versions)}{cur}; see `tessera models list`"
            )
        super().__init__(msg)


class CorruptVersionError(ModelError):
    """A version's directory is incomplete or its files do not match its manifest.

    The message names the version and what is wrong, e.g.
    ``model 'ranker' version 'v2' is corrupt: file 'model.onnx' sha256 mismatch``.
    """

    def __init__(self, *, kind: str, version: str, reason: str):
        self.kind = kind
        self.version = version
        self.reason = reason
        super().__init__(
            f"model {kind!r} version {version!r} is corrupt: {reason}; "
            "republish it, or promote another version (`tessera models promote`)"
        )
