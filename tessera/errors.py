"""Exceptions of the ``tessera`` runtime (broker, topics, command line); each says how to fix it."""

from __future__ import annotations

from features.errors import TesseraError

__all__ = [
    "BootstrapNotConfiguredError",
    "BrokerAlreadyRunningError",
    "BrokerError",
    "TesseraError",
    "TopicError",
]


class BrokerError(TesseraError):
    """The embedded broker could not be started, reached or stopped."""


class BrokerAlreadyRunningError(BrokerError):
    """``start`` found a live broker already recorded in the state directory."""

    def __init__(self, *, pid: int, bootstrap: str | None, state_dir: str):
        self.pid = pid
        self.bootstrap = bootstrap
        self.state_dir = state_dir
        where = f" at {bootstrap}" if bootstrap else ""
        super().__init__(
            f"an embedded broker is already running{where} (pid {pid}, state dir {state_dir}); "
            "use it, or run `tessera broker stop` first"
        )


class BootstrapNotConfiguredError(BrokerError):
    """No Kafka bootstrap address was given and none could be found."""

    def __init__(self, *, state_dir: str):
        self.state_dir = state_dir
        super().__init__(
            f"no Kafka bootstrap address: no embedded broker is running (state dir {state_dir}) "
            "and TESSERA_BOOTSTRAP is not set; run `tessera broker start`, "
            "or pass --bootstrap HOST:PORT"
        )


class TopicError(TesseraError):
    """A topic could not be created, listed or deleted."""
