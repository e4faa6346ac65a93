"""The circuit breaker of one handler: closed, open after N failures, half-open trial.

While open the handler is skipped (each skip counted) for ``reset`` seconds;
then one trial event decides whether it closes again. The engine reads
``state`` on the token path (one attribute); transitions happen on the
delivery side.
"""

from __future__ import annotations

from collections.abc import Callable

Clock = Callable[[], float]


class BreakerState:
    """Closed → open after N consecutive failures → half-open trial → closed or open."""

    def __init__(self, failures: int | None, reset: float, clock: Clock) -> None:
        self.threshold = failures
        self.reset = reset
        self.clock = clock
        self.state = "closed"
        self.consecutive = 0
        self.opened_at = 0.0
        self.trial_running = False

    def admit(self) -> tuple[bool, str | None]:
        """Whether the next event may run, and the state entered if that changed."""
        if self.threshold is None or self.state == "closed":
            return True, None
        if self.state == "open" and self.clock() - self.opened_at >= self.reset:
            self.state = "half_open"
            self.trial_running = True
            return True, "half_open"
        if self.state == "half_open" and not self.trial_running:
            self.trial_running = True
            return True, None
        return False, None

    def resting(self) -> bool:
        """Open, and not yet due for a trial: events are skipped (read without a lock)."""
        return self.state == "open" and self.clock() - self.opened_at < self.reset

    def succeeded(self) -> str | None:
        self.consecutive = 0
        if self.state == "half_open":
            self.state = "closed"
            self.trial_running = False
            return "closed"
        return None

    def failed(self) -> str | None:
        self.consecutive += 1
        if self.threshold is None:
            return None
        if self.state == "half_open" or (
            self.state == "closed" and self.consecutive >= self.threshold
        ):
            self.state = "open"
            self.opened_at = self.clock()
            self.trial_running = False
            return "open"
        return None
