"""How much of the engine's time the expensive precision levels may take while STANDARD work waits.

One step runs one call per precision level in turn, and a HIGH or ULTRA call
costs many STANDARD ones (ULTRA ~50× on a CPU). Left alone, one ULTRA stream
would stretch every STANDARD stream's inter-token gap by that much. So the
expensive levels earn credit while STANDARD calls run — `share / (1 - share)`
of their seconds — and spend their own seconds from it: a step defers them
while the credit is negative and STANDARD work is waiting. Over time they take
at most `share` of the engine's time, so STANDARD's mean inter-token latency
grows by at most 1 / (1 - share) (1.33× at the default 0.25); a gap that
holds an expensive call is longer still, by that call.

Credit is only earned while both kinds of work are pending (an ULTRA request
arriving after an hour of STANDARD traffic has no hour of credit to burst
through), and a debt is forgiven when no STANDARD work is left (nothing to
protect: the expensive levels then run every step).

Plain Python over seconds and flags, decided by the engine each step.
"""

from __future__ import annotations


class PrecisionShare:
    def __init__(self, share: float = 0.25):
        if not 0 < share <= 1:
            raise ValueError(f"the expensive levels' share of time must be in (0, 1], got {share}")
        self.share = share
        self.credit = 0.0  # seconds the expensive levels may still spend ahead of STANDARD work
        self._last_expensive = 0.0  # seconds of the latest step's expensive calls: the most credit kept

    def defers_expensive(self, *, has_cheap_work: bool, has_expensive_work: bool) -> bool:
        """Whether this step leaves the expensive levels out."""
        return self.share < 1 and has_cheap_work and has_expensive_work and self.credit < 0

    def record(self, *, cheap_seconds: float, expensive_seconds: float, has_cheap_work: bool,
               has_expensive_work: bool) -> None:
        """Account for a step: the seconds its STANDARD and its expensive calls took, and whether each
        kind of work was pending when it was scheduled."""
        if not has_cheap_work:
            self.credit = 0.0
            return
        if not has_expensive_work:
            self.credit = min(self.credit, 0.0)
            return
        if expensive_seconds > 0:
            self._last_expensive = expensive_seconds
        if self.share < 1:
            self.credit += cheap_seconds * self.share / (1 - self.share) - expensive_seconds
            self.credit = min(self.credit, self._last_expensive)
