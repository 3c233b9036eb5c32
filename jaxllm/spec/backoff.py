"""Per-request back-off: stop proposing when proposals keep being rejected, probe again later.

A rejected proposal is not free: its sequence feeds k + 1 tokens instead of one (on CPU a
lone decode moves from the 1-token bucket to the 8-token one, ~1.4x the step), so a request
whose text has nothing to copy must stop paying for it.

The rule (`SpeculativeConfig` holds the numbers):
- every verification that had proposals is recorded as (proposed, accepted);
- once `window` verifications are recorded, if accepted / proposed over them is below
  `min_rate`, the request pauses: its next `pause` scheduled steps propose nothing, and the
  pause doubles (up to `max_pause`) each time the probe after a pause fails again;
- a window at or above `min_rate` resets the pause to its initial length; either way the
  window starts empty again, so every judgement is over fresh verifications.
Steps where the proposer found nothing to propose record nothing and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxllm.spec.config import SpeculativeConfig


@dataclass
class SpeculationBackoff:
    """One request's back-off state; `proposal_length` once per scheduled step, `record`
    once per verification."""

    window: int = 4
    min_rate: float = 0.2
    initial_pause: int = 8
    max_pause: int = 128
    next_pause: int = field(init=False)
    paused_steps_left: int = field(default=0, init=False)
    _proposed: int = field(default=0, init=False)
    _accepted: int = field(default=0, init=False)
    _recorded: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.next_pause = self.initial_pause

    @classmethod
    def from_config(cls, config: SpeculativeConfig) -> SpeculationBackoff:
        return cls(window=config.backoff_window, min_rate=config.min_acceptance_rate,
                   initial_pause=config.backoff_steps, max_pause=config.max_backoff_steps)

    @property
    def paused(self) -> bool:
        return self.paused_steps_left > 0

    def proposal_length(self, k: int) -> int:
        """Tokens this step may propose: 0 while paused (each call spends one paused step)."""
        if self.paused_steps_left > 0:
            self.paused_steps_left -= 1
            return 0
        return k

    def record(self, proposed: int, accepted: int) -> None:
        """One verification's outcome: `accepted` of `proposed` drafts were kept."""
        if not 0 <= accepted <= proposed:
            raise ValueError(f"accepted ({accepted}) must be in [0, proposed ({proposed})]")
        if proposed == 0:
            return
        self._proposed += proposed
        self._accepted += accepted
        self._recorded += 1
        if self._recorded < self.window:
            return
        if self._accepted < self.min_rate * self._proposed:
            self.paused_steps_left = self.next_pause
            self.next_pause = min(2 * self.next_pause, self.max_pause)
        else:
            self.next_pause = self.initial_pause
        self._proposed = self._accepted = self._recorded = 0
