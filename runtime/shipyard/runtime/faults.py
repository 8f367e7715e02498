"""Fault injection for rollout testing: a fraction of inference requests fails with HTTP 500 and/or every
inference request is answered late. Off by default; the e2e tests make a "bad version" with it.

Pure apart from the pseudo-random draw, which comes from a `random.Random` the injector owns (seedable).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultConfig:
    error_rate: float = 0.0  # fraction of inference requests answered 500, 0..1
    extra_latency_s: float = 0.0  # added to every inference response
    seed: int | None = None

    @property
    def active(self) -> bool:
        return self.error_rate > 0 or self.extra_latency_s > 0


def build_fault_config(error_rate: float, extra_latency_ms: float, seed: int | None = None) -> FaultConfig:
    """Validate fault settings; raises ValueError naming the bad one."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"fault error rate must be within 0..1, got {error_rate}")
    if extra_latency_ms < 0:
        raise ValueError(f"fault extra latency must be >= 0 ms, got {extra_latency_ms}")
    return FaultConfig(error_rate, extra_latency_ms / 1000.0, seed)


def evaluate_fault(draw: float, error_rate: float) -> bool:
    """Whether a request with uniform draw in [0, 1) is failed: exactly a fraction `error_rate` of draws."""
    return draw < error_rate


class FaultInjector:
    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._random = random.Random(config.seed)

    def should_fail(self) -> bool:
        rate = self.config.error_rate
        return rate > 0 and evaluate_fault(self._random.random(), rate)
