"""Reconnect pacing. Time and randomness are parameters: this module does no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """Exponential backoff with full jitter and a cap.

    Call :meth:`next_delay` after each failed attempt, :meth:`reset` after a success.
    """

    base: float = 0.1
    cap: float = 5.0
    factor: float = 2.0
    attempts: int = 0

    def next_delay(self, random: Callable[[], float]) -> float:
        """Seconds to wait before the next attempt.

        Args:
            random: returns a float in [0, 1); jitter spreads reconnecting clients so
                a restarted server is not hit by all of them at once.
        """
        # The exponent is capped too: factor**attempts would overflow after ~1000 tries.
        ceiling = min(self.cap, self.base * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        # Half fixed, half random: never retries in a tight loop, still spreads out.
        return ceiling / 2 + random() * ceiling / 2

    def reset(self) -> None:
        self.attempts = 0
