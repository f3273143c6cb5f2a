"""Online store: one interface (``OnlineStore``), an embedded LMDB backend and Aerospike.

Open a store by URL::

    store = open_store("lmdb:///var/lib/tessera/store")          # absolute path
    store = open_store("lmdb://data/store?sync=0")                 # relative path, no fsync
    store = open_store("aerospike://10.0.0.1:3000,10.0.0.2:3000/tessera?ttl=2764800")
"""

from __future__ import annotations

from urllib.parse import parse_qs

from features.store.base import (
    NO_WATERMARK,
    ActionSequence,
    BlockRow,
    OnlineStore,
    SequenceRow,
    ValueRow,
    ValuesResult,
)
from features.store.blocktable import BlockTable
from features.store.errors import (
    CorruptRecordError,
    ReadOnlyStoreError,
    StoreError,
    StoreUnavailableError,
)

SUPPORTED_SCHEMES = ("lmdb", "aerospike")

__all__ = [
    "NO_WATERMARK",
    "ActionSequence",
    "BlockRow",
    "BlockTable",
    "CorruptRecordError",
    "OnlineStore",
    "ReadOnlyStoreError",
    "SequenceRow",
    "StoreError",
    "StoreUnavailableError",
    "ValueRow",
    "ValuesResult",
    "open_store",
]

_USAGE = (
    "use lmdb:///absolute/path, lmdb://relative/path or "
    "aerospike://host:3000[,host2:3000]/namespace"
)


def _options(url: str, query: str, allowed: dict[str, type]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        if name not in allowed:
            raise StoreError(
                f"store URL {url!r}: unknown option {name!r}; allowed: {', '.join(sorted(allowed))}"
            )
        raw = values[-1]
        kind = allowed[name]
        try:
            if kind is bool:
                if raw.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(raw)
                out[name] = raw.lower() in ("1", "true")
            else:
                out[name] = kind(raw)
        except ValueError as exc:
            raise StoreError(
                f"store URL {url!r}: option {name}={raw!r} is not a valid {kind.__name__}"
            ) from exc
    return out


def open_store(url: str, *, readonly: bool = False) -> OnlineStore:
    """Open the online store named by ``url``.

    Args:
        url: ``lmdb:///abs/path`` or ``lmdb://relative/path`` (options ``map_size``, ``sync``),
            or ``aerospike://host:3000[,host2:3000]/namespace`` (options ``ttl`` in seconds,
            ``timeout_ms``, ``socket_timeout_ms``, ``retries``, ``connect_timeout_ms``,
            ``max_conns``: see ``AerospikeStore``).
        readonly: open for reading only; writes raise ``ReadOnlyStoreError``.

    Raises:
        StoreError: the URL's scheme or options are not supported.
        StoreUnavailableError: the store cannot be opened or reached.
    """
    if not isinstance(url, str) or "://" not in url:
        raise StoreError(
            f"store URL {url!r} has no scheme; supported schemes: {', '.join(SUPPORTED_SCHEMES)}; {_USAGE}"
        )
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    if scheme == "lmdb":
        from features.store.lmdb_store import LmdbStore

        if not rest:
            raise StoreError(f"store URL {url!r} has no path; {_USAGE}")
        opts = _options(url, query, {"map_size": int, "sync": bool})
        return LmdbStore(rest, readonly=readonly, **opts)
    if scheme == "aerospike":
        from features.store.aerospike_store import AerospikeStore, parse_hosts

        hosts_text, _, namespace = rest.partition("/")
        if not hosts_text or not namespace or "/" in namespace:
            raise StoreError(f"store URL {url!r} needs hosts and one namespace; {_USAGE}")
        opts = _options(url, query, {"ttl": int, "timeout_ms": int, "socket_timeout_ms": int,
                                     "retries": int, "connect_timeout_ms": int,
                                     "max_conns": int})
        ttl = opts.pop("ttl", None)
        return AerospikeStore(parse_hosts(hosts_text), namespace, readonly=readonly, ttl_s=ttl,
                              **opts)
    raise StoreError(
        f"store URL {url!r}: unsupported scheme {scheme!r}; supported schemes: "
        f"{', '.join(SUPPORTED_SCHEMES)}; {_USAGE}"
    )
