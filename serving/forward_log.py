"""Forward logging of impressions and posted engagements to Kafka, off the request path,
with a disk spool.

Requests hand their impressions to ``ImpressionLogger.log`` and ``/v1/events`` its
engagements to ``EngagementForwarder.send`` (bounded queues, never blocking the request on
Kafka). A background thread encodes each request's impressions as one columnar batch
envelope (an engagement arrives encoded, with its key) and produces it. Whatever Kafka does
not acknowledge (broker down: librdkafka fails the delivery after ``message.timeout.ms``) is
appended to a spool file on disk, fsynced; a drainer resends spooled messages once Kafka acknowledges again and
deletes each spool segment only after every message in it was acknowledged. Nothing is
dropped: a full queue spools synchronously instead.
"""

from __future__ import annotations

import fcntl
import os
import queue
import struct
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.columnar import EventColumns, encode_batch, records_to_columns
from tessera.logs import get_logger

log = get_logger("serving.forward_log")
_LEN = struct.Struct("<I")


def _count_of(records: EventColumns | list[dict]) -> int:
    return records.n if isinstance(records, EventColumns) else len(records)


class Spool:
    """Length-prefixed messages in segment files; append is fsynced.

    Several serving processes (``tessera serve --workers N``) share one spool directory. Each
    holds an exclusive ``flock`` on the segment it is appending to, and a drain takes only
    segments it can lock itself, holding the lock until it has sent and deleted them: no
    process sends or deletes a segment another is still writing, and no two send the same
    one. A segment whose writer died is unlocked (the kernel drops a dead process's locks)
    and drained by whichever process gets to it first.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._current: Path | None = None
        self._current_fd: int | None = None

    def append(self, payloads: list[bytes]) -> None:
        """Persist ``payloads`` (durable when this returns)."""
        if not payloads:
            return
        data = b"".join(_LEN.pack(len(p)) + p for p in payloads)
        with self._lock:
            if self._current_fd is None:
                name = f"spool-{time.time_ns()}-{uuid.uuid4().hex[:6]}.bin"
                # locked under a name no drain lists, then renamed (same file, same lock):
                # another process's drain never sees it unlocked and empty
                hidden = self.dir / f".{name}.new"
                fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(hidden, self.dir / name)
                self._current, self._current_fd = self.dir / name, fd
            fd = self._current_fd
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                # never leave a torn record: cut the segment back to its last whole one
                try:
                    os.ftruncate(fd, before)
                except OSError:
                    self._close_current()  # start a fresh segment next time
                raise

    def _close_current(self) -> None:
        if self._current_fd is not None:
            os.close(self._current_fd)  # releases this process's lock on it
        self._current, self._current_fd = None, None

    def take_segments(self) -> list[SpoolSegment]:
        """Close the current segment and lock every segment no other process holds.

        The caller sends each one's messages, then ``remove()``s it or ``release()``s it
        for a later drain.
        """
        with self._lock:
            self._close_current()
        taken = []
        for path in sorted(self.dir.glob("spool-*.bin")):
            segment = SpoolSegment.lock(path)
            if segment is not None:
                taken.append(segment)
        return taken

    @staticmethod
    def read(segment: Path) -> list[bytes]:
        """Every complete message of a segment (a torn tail from a crash is ignored)."""
        data = segment.read_bytes()
        out, pos = [], 0
        while pos + 4 <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if pos + 4 + n > len(data):
                break
            out.append(data[pos + 4:pos + 4 + n])
            pos += 4 + n
        return out

    def pending(self) -> int:
        """Number of spooled messages (every process's segments)."""
        total = 0
        for path in sorted(self.dir.glob("spool-*.bin")):
            try:
                total += len(self.read(path))
            except FileNotFoundError:
                pass  # drained meanwhile
        return total


@dataclass
class SpoolSegment:
    """A spool segment this process has locked for draining (see ``Spool``)."""

    path: Path
    fd: int

    @classmethod
    def lock(cls, path: Path) -> SpoolSegment | None:
        """Lock ``path`` without waiting; None if another process holds it or it is gone."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None  # drained and deleted by another process meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # locked: but another drain may have deleted it just before (same inode?)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            return None
        return cls(path, fd)

    def read(self) -> list[bytes]:
        """Every complete message in the segment."""
        return Spool.read(self.path)

    def remove(self) -> None:
        """Delete the segment (all of it was sent) and drop the lock."""
        self.path.unlink()
        self.release()

    def release(self) -> None:
        """Drop the lock; the segment stays for a later drain."""
        os.close(self.fd)


_KEY = struct.Struct("<I")
_NO_KEY = 0xFFFFFFFF


def pack_keyed(key: bytes | None, value: bytes) -> bytes:
    """One spool payload holding a Kafka message's key (None kept apart from b"") and value."""
    if key is None:
        return _KEY.pack(_NO_KEY) + value
    return _KEY.pack(len(key)) + key + value


def unpack_keyed(payload: bytes) -> tuple[bytes | None, bytes]:
    """The (key, value) ``pack_keyed`` packed."""
    (n,) = _KEY.unpack_from(payload)
    if n == _NO_KEY:
        return None, payload[_KEY.size:]
    return payload[_KEY.size:_KEY.size + n], payload[_KEY.size + n:]


class ForwardLog:
    """Loss-free forwarding to one Kafka topic off the caller's thread (see the module
    docstring): a background thread produces what is queued, spools what Kafka does not
    acknowledge, and resends the spool once Kafka answers. Subclasses say what a queued
    item is (``_message``) and count outcomes (``_count``)."""

    #: the background thread's name
    thread_name = "forward-log"

    def __init__(self, bootstrap: str | None, spool_dir: Path, *, topic: str,
                 keyed: bool = False, queue_size: int = 10_000, drain_interval_s: float = 2.0):
        self.topic = topic
        #: spooled payloads carry the message key (``pack_keyed``)
        self.keyed = keyed
        self.spool = Spool(spool_dir)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._producer = None
        self._last_ack = 0.0
        self._drain_interval = drain_interval_s
        self._inflight = 0
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        # payloads the spool could not take (disk full): kept in memory, retried each cycle
        self._unspooled: list[bytes] = []
        self.spool_errors = 0
        if bootstrap:
            from confluent_kafka import Producer

            from tessera.topics import producer_config

            self._producer = Producer(producer_config(
                bootstrap, **{"message.timeout.ms": 5000, "socket.timeout.ms": 3000,
                              "reconnect.backoff.max.ms": 1000, "linger.ms": 5}))
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def _enqueue(self, item: Any) -> None:
        """Queue ``item`` (returns at once; spools it now if the queue is full)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            key, payload, n = self._message(item)
            self._spool([self._spooled(key, payload)], n)

    def _message(self, item: Any) -> tuple[bytes | None, bytes, int]:
        """(key, value, events) of a queued item."""
        raise NotImplementedError

    def _count(self, outcome: str, n: int) -> None:
        """Count ``n`` events ``sent``, ``spooled`` or ``held_in_memory``."""

    def _spooled(self, key: bytes | None, payload: bytes) -> bytes:
        return pack_keyed(key, payload) if self.keyed else payload

    def _spool(self, payloads: list[bytes], n: int) -> None:
        """Persist payloads; if the disk refuses (full, read-only), keep them in memory.

        Nothing is dropped: held payloads are retried on every cycle of the logger thread and
        sent straight to Kafka once it answers. The error is logged and counted once per
        failing write.
        """
        try:
            self.spool.append(payloads)
            self._count("spooled", n)
        except OSError as exc:
            with self._lock:
                self._unspooled.extend(payloads)
                self.spool_errors += 1
            self._count("held_in_memory", n)
            log.error("spool_write_failed", error=str(exc), held=len(self._unspooled),
                      spool=str(self.spool.dir), topic=self.topic)

    # ------------------------------------------------------------------ background
    def _send(self, key: bytes | None, payload: bytes, n: int) -> None:
        if self._producer is None:
            self._spool([self._spooled(key, payload)], n)
            return

        def delivered(err, _msg, key=key, payload=payload, n=n) -> None:
            with self._lock:
                self._inflight -= 1
            if err is not None:
                self._spool([self._spooled(key, payload)], n)
            else:
                self._last_ack = time.monotonic()
                self._count("sent", n)

        while True:
            try:
                with self._lock:
                    self._inflight += 1
                self._producer.produce(self.topic, payload, key=key, on_delivery=delivered)
                return
            except BufferError:
                with self._lock:
                    self._inflight -= 1
                self._producer.poll(0.1)

    def _run(self) -> None:
        next_drain = time.monotonic() + self._drain_interval
        while not self._stop.is_set() or not self._queue.empty():
            try:  # this thread must survive anything: it is the only way messages leave
                try:
                    self._send(*self._message(self._queue.get(timeout=0.05)))
                except queue.Empty:
                    pass
                if self._producer is not None:
                    self._producer.poll(0)
                if time.monotonic() >= next_drain:
                    self._retry_held()
                    if self._producer is not None:
                        self._drain()
                    next_drain = time.monotonic() + self._drain_interval
            except Exception as exc:
                log.error("forward_log_error", topic=self.topic, error=str(exc)[:300])
                time.sleep(0.1)

    def _retry_held(self) -> None:
        """Payloads the disk refused: spool them now if it has room, else keep holding."""
        with self._lock:
            held, self._unspooled = self._unspooled, []
        if not held:
            return
        try:
            self.spool.append(held)
            log.info("spool_recovered", messages=len(held))
        except OSError:
            with self._lock:
                self._unspooled = held + self._unspooled

    def _reachable(self) -> bool:
        try:
            self._producer.list_topics(self.topic, timeout=1.0)
            return True
        except Exception:
            return False

    def _drain(self) -> None:
        """Resend spooled messages once Kafka answers; delete a segment when all were acked.

        One drain at a time (the background thread and ``drain_now`` may both call it): two
        drains reading the same segment would send its messages twice.
        """
        with self._drain_lock:
            self._drain_locked()

    def _drain_locked(self) -> None:
        segments = sorted(self.spool.dir.glob("spool-*.bin"))
        if not segments or not self._reachable():
            return
        taken = self.spool.take_segments()
        try:
            while taken:
                if not self._drain_segment(taken[0]):
                    return  # still unacknowledged: kept for the next drain
                taken.pop(0)
        finally:
            for segment in taken:
                segment.release()

    def _drain_segment(self, segment: SpoolSegment) -> bool:
        """Send one locked segment; delete it once every message was acknowledged."""
        payloads = segment.read()
        failed: list[bytes] = []

        def done(err, _msg, p) -> None:
            if err is not None:
                failed.append(p)  # callbacks run in this thread (flush/poll): no lock

        for p in payloads:
            key, value = unpack_keyed(p) if self.keyed else (None, p)
            self._producer.produce(self.topic, value, key=key,
                                   on_delivery=lambda e, m, p=p: done(e, m, p))
        if self._producer.flush(15):
            return False
        if failed:
            self.spool.append(failed)  # into this process's current segment, before the delete
        segment.remove()
        if not failed:
            log.info("spool_drained", messages=len(payloads))
        return True

    def flush(self, timeout_s: float = 15.0) -> None:
        """Wait until queued impressions were handed to Kafka (or spooled)."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._producer is not None:
            self._producer.flush(max(0.0, deadline - time.monotonic()))

    def drain_now(self) -> None:
        """Resend the spool now (tests, admin)."""
        self._retry_held()
        if self._producer is not None:
            self._drain()

    @property
    def held_in_memory(self) -> int:
        """Payloads waiting in memory because the spool disk refused them."""
        return len(self._unspooled)

    def close(self, timeout_s: float = 15.0) -> None:
        """Stop the thread; anything not acknowledged by then stays in the spool."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        if self._producer is not None:
            self._producer.flush(timeout_s)


class ImpressionLogger(ForwardLog):
    """Asynchronous, loss-free impression logging: a request's impressions become one
    columnar batch message (see the module docstring)."""

    thread_name = "impression-logger"

    def __init__(self, bootstrap: str | None, spool_dir: Path, *, topic: str = "impressions",
                 metrics: Any = None, queue_size: int = 10_000, drain_interval_s: float = 2.0):
        self.metrics = metrics
        super().__init__(bootstrap, spool_dir, topic=topic, queue_size=queue_size,
                         drain_interval_s=drain_interval_s)

    def log(self, records: EventColumns | list[dict]) -> None:
        """Queue one request's impressions, as columns or one dict each (returns at once;
        spools if the queue is full)."""
        if _count_of(records):
            self._enqueue(records)

    def _message(self, item: EventColumns | list[dict]) -> tuple[bytes | None, bytes, int]:
        if isinstance(item, EventColumns):
            return None, encode_batch(item), item.n
        return None, encode_batch(records_to_columns(self.topic, item)), len(item)

    def _count(self, outcome: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.impressions.labels(outcome=outcome).inc(n)


class EngagementForwarder(ForwardLog):
    """Engagements posted to serving (``POST /v1/events``), one keyed message each, as loss
    free as impressions: what Kafka does not acknowledge within the producer's message
    timeout is spooled (its own directory, keys kept) and resent when Kafka answers. A
    client resending an event after a timeout is counted once by the workers' ``event_id``
    deduplication."""

    thread_name = "engagement-forwarder"

    def __init__(self, bootstrap: str | None, spool_dir: Path, *, topic: str = "engagements",
                 metrics: Any = None, queue_size: int = 100_000, drain_interval_s: float = 2.0):
        self.metrics = metrics
        super().__init__(bootstrap, spool_dir, topic=topic, keyed=True, queue_size=queue_size,
                         drain_interval_s=drain_interval_s)

    def send(self, key: bytes | None, value: bytes) -> None:
        """Queue one encoded engagement (returns at once; spools it if the queue is full)."""
        self._enqueue((key, value))

    def _message(self, item: tuple[bytes | None, bytes]) -> tuple[bytes | None, bytes, int]:
        return item[0], item[1], 1

    def _count(self, outcome: str, n: int) -> None:
        if self.metrics is not None:
            self.metrics.engagements.labels(outcome=outcome).inc(n)
