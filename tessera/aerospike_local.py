"""A local single-node Aerospike server for tests, benchmarks and fault runs.

The server binary is the Community Edition build in ``../shared/aerospike/`` beside the
checkout (or ``$TESSERA_AEROSPIKE_DIR``); no registry these machines reach packages one.
``LocalAerospike`` writes its own configuration (namespace ``test``, bound to 127.0.0.1,
service on ``port``, fabric and heartbeat on ``port + 1`` and ``port + 2``), so it can keep
its data across a restart: with ``persistent=True`` the in-memory namespace is backed by a
file in the state directory, as a production node is backed by a device. Ready means the
client can connect and write, not that a log line appeared.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tessera.broker import find_free_port

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "test"


def server_dir() -> Path:
    """Where the server build is: ``$TESSERA_AEROSPIKE_DIR`` or ``../shared/aerospike``."""
    return Path(os.environ.get("TESSERA_AEROSPIKE_DIR", REPO.parent / "shared" / "aerospike"))


def available() -> bool:
    """Whether a server build is present (tests skip without one)."""
    return (server_dir() / "asd").is_file()


_CONF = """\
service {{
	cluster-name tessera-local
	proto-fd-max 1024
	work-directory {work}
}}
mod-lua {{
	user-path {work}/usr/udf/lua
}}
logging {{
	file {log} {{
		context any info
	}}
}}
network {{
	service {{
		address 127.0.0.1
		port {port}
	}}
	heartbeat {{
		mode mesh
		address 127.0.0.1
		port {heartbeat}
		interval 150
		timeout 10
	}}
	fabric {{
		address 127.0.0.1
		port {fabric}
	}}
}}
namespace {namespace} {{
	replication-factor 1
	default-ttl 0
	nsup-period 60
	storage-engine memory {{
{storage}
	}}
}}
"""


class LocalAerospike:
    """Start and stop one local server (start again after a stop: a restart); ``hosts`` is ``127.0.0.1:port``.

    Args:
        state_dir: configuration, logs and (when persistent) the data file.
        port: service port (default: a free one; ``port + 1`` and ``+ 2`` are used too).
        persistent: back the namespace with a file, so a restart keeps every record.
        size_mb: the namespace's size.
    """

    def __init__(self, state_dir: Path, port: int | None = None, *, persistent: bool = False,
                 size_mb: int = 1024):
        if not available():
            raise FileNotFoundError(
                f"no Aerospike server build at {server_dir()}; set TESSERA_AEROSPIKE_DIR")
        self.state_dir = Path(state_dir).resolve()
        self.port = port or _free_port_triple()
        self.persistent = persistent
        self.size_mb = size_mb
        self.proc: subprocess.Popen | None = None

    @property
    def hosts(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def store_url(self) -> str:
        return f"aerospike://{self.hosts}/{NAMESPACE}"

    def _write_config(self) -> Path:
        work = self.state_dir / "work"
        for d in (work / "smd", work / "usr" / "udf" / "lua", self.state_dir / "log"):
            d.mkdir(parents=True, exist_ok=True)
        storage = (f"\t\tfile {work}/{NAMESPACE}.dat\n\t\tfilesize {self.size_mb}M"
                   if self.persistent else f"\t\tdata-size {self.size_mb}M")
        conf = self.state_dir / "aerospike.conf"
        conf.write_text(_CONF.format(work=work, log=self.state_dir / "log" / "aerospike.log",
                                     port=self.port, heartbeat=self.port + 2,
                                     fabric=self.port + 1, namespace=NAMESPACE,
                                     storage=storage))
        return conf

    def start(self, timeout_s: float = 30.0) -> LocalAerospike:
        """Start the server and wait until a client can write to the namespace."""
        conf = self._write_config()
        out = open(self.state_dir / "log" / "asd.stdout", "ab")
        self.proc = subprocess.Popen(
            [str(server_dir() / "asd"), "--foreground", "--config-file", str(conf)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"asd exited {self.proc.returncode} during start-up; see "
                                   f"{self.state_dir / 'log' / 'aerospike.log'}")
            if self._writable():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"asd did not become ready in {timeout_s:g}s; see "
                           f"{self.state_dir / 'log' / 'aerospike.log'}")

    def _writable(self) -> bool:
        import aerospike

        try:
            client = aerospike.client({"hosts": [("127.0.0.1", self.port)],
                                       "connect_timeout": 500}).connect()
        except Exception:
            return False
        try:
            client.put((NAMESPACE, "tessera_ready", "probe"), {"v": 1})
            return True
        except Exception:
            return False
        finally:
            client.close()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait until it has exited."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def namespace_stats(self) -> dict[str, str]:
        """The server's ``namespace/test`` statistics (objects, used bytes, ...)."""
        import aerospike

        client = aerospike.client({"hosts": [("127.0.0.1", self.port)]}).connect()
        try:
            info = client.info_all(f"namespace/{NAMESPACE}")
        finally:
            client.close()
        _, text = next(iter(info.values()))
        pairs = (kv.split("=", 1) for kv in text.strip().split(";") if "=" in kv)
        return {k: v for k, v in pairs}

    def __enter__(self) -> LocalAerospike:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port_triple() -> int:
    """A port whose next two are free too (fabric and heartbeat)."""
    import socket

    for _ in range(50):
        port = find_free_port()
        if port > 65_000:
            continue
        try:
            for p in (port + 1, port + 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports found")
