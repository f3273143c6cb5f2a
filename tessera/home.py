"""Where Tessera keeps local state: ``$TESSERA_HOME``, else ``./.tessera`` (one owner)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: Environment variable naming Tessera's state root (broker, store, warehouse, registry).
HOME_ENV = "TESSERA_HOME"

#: What ``--store`` defaults to, in help texts.
STORE_DEFAULT_TEXT = "lmdb://$TESSERA_HOME/store, else lmdb://.tessera/store"


def tessera_home(*, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """``$TESSERA_HOME`` if set, else ``.tessera`` under ``cwd`` (default: the current dir)."""
    env = os.environ if env is None else env
    home = env.get(HOME_ENV)
    return Path(home) if home else (cwd or Path.cwd()) / ".tessera"


def default_store_url(*, env: Mapping[str, str] | None = None) -> str:
    """The online store every command uses unless told otherwise: LMDB under the home.

    Without ``$TESSERA_HOME`` it is the relative ``lmdb://.tessera/store`` (as before).
    """
    env = os.environ if env is None else env
    home = env.get(HOME_ENV)
    if not home:
        return "lmdb://.tessera/store"
    return f"lmdb://{Path(home).resolve() / 'store'}"
