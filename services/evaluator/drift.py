"""Drift: each signal of a route and model (quality score, latency, escalation rate, confidence)
over the current hourly and daily window, against a band around its own trailing baseline.

The baseline is the mean of each earlier window (the last 24 hours, the last 7 days) that had at
least `min_samples` samples; windows with no traffic are left out, not counted as zero. The band is
mean ± max(sigmas × standard deviation, a floor), the floor keeping a very steady baseline from
flagging noise. A signal drifts when its current window, once it has `min_samples` samples, is
outside the band on the harmful side: score or confidence below it, latency or escalation above.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from schemas.quality import ScoreRecord

SIGNALS = ("score", "latency_ms", "escalation", "confidence")
HARMFUL = {"score": -1, "latency_ms": 1, "escalation": 1, "confidence": -1}  # which side of the band hurts
# The narrowest half-band: absolute for shares (0-1), relative to the mean for latency.
MIN_HALF_WIDTH = {"score": 0.05, "escalation": 0.05, "confidence": 0.05}
MIN_LATENCY_HALF_WIDTH = 0.25  # of the mean


@dataclass(frozen=True)
class Window:
    name: str
    length_s: float
    baseline_windows: int


HOURLY = Window("hourly", 3600.0, 24)
DAILY = Window("daily", 86400.0, 7)


@dataclass(frozen=True)
class Band:
    mean: float
    low: float
    high: float
    windows: int  # how many earlier windows the baseline is made of


def band(history: list[float], signal: str, *, sigmas: float = 3.0, min_windows: int = 3) -> Band | None:
    """The band around `history` (one mean per earlier window); None with fewer than `min_windows`."""
    if len(history) < min_windows:
        return None
    mean = sum(history) / len(history)
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
    floor = MIN_HALF_WIDTH.get(signal, MIN_LATENCY_HALF_WIDTH * abs(mean))
    half = max(sigmas * std, floor)
    return Band(mean, mean - half, mean + half, len(history))


def harmful(value: float, within: Band, signal: str) -> bool:
    """Whether `value` is outside the band on the side that hurts."""
    return value < within.low if HARMFUL[signal] < 0 else value > within.high


def values(record: ScoreRecord) -> dict[str, float]:
    """The signals one scored answer contributes to."""
    out = {"score": record.score, "latency_ms": float(record.latency_ms), "escalation": float(record.escalated)}
    if record.confidence is not None:
        out["confidence"] = record.confidence
    return out


@dataclass(frozen=True)
class State:
    route: str
    model: str
    signal: str
    window: str
    value: float | None  # the current window's mean, once it has min_samples
    samples: int
    band: Band | None
    drifting: bool


class Tracker:
    """Per route, model, signal and window: a sum and a count per window index, for as many earlier
    windows as the baseline needs. Fed every score record; asked for the state at any time."""

    def __init__(self, windows: tuple[Window, ...] = (HOURLY, DAILY), *, min_samples: int = 20,
                 sigmas: float = 3.0, min_windows: int = 3):
        self.windows = windows
        self.min_samples = min_samples
        self.sigmas = sigmas
        self.min_windows = min_windows
        # (route, model, signal, window name) -> window index -> [sum, count]
        self._sums: dict[tuple[str, str, str, str], dict[int, list[float]]] = defaultdict(dict)

    def observe(self, record: ScoreRecord) -> None:
        at_s = record.created_at_ms / 1000
        for window in self.windows:
            index = int(at_s // window.length_s)
            for signal, value in values(record).items():
                cell = self._sums[(record.route, record.model, signal, window.name)].setdefault(index, [0.0, 0])
                cell[0] += value
                cell[1] += 1

    def states(self, now_s: float) -> list[State]:
        """Every series' state now; drops windows too old to be in any baseline."""
        by_name = {w.name: w for w in self.windows}
        out = []
        for (route, model, signal, name), cells in self._sums.items():
            window = by_name[name]
            current = int(now_s // window.length_s)
            for index in [i for i in cells if i < current - window.baseline_windows]:
                del cells[index]
            value, count, within, drifting = assess(cells, current, window, signal, min_samples=self.min_samples,
                                                    sigmas=self.sigmas, min_windows=self.min_windows)
            out.append(State(route, model, signal, name, value, count, within, drifting))
        return out


def assess(cells, current: int, window: Window, signal: str, *, min_samples: int = 20, sigmas: float = 3.0,
           min_windows: int = 3) -> tuple[float | None, int, Band | None, bool]:
    """One series from its (sum, count) per window index: the current window's mean (None under
    `min_samples`), its sample count, the band of the earlier windows, and whether it drifts."""
    history = [total / n for i, (total, n) in sorted(cells.items())
               if current - window.baseline_windows <= i < current and n >= min_samples]
    total, count = cells.get(current, (0.0, 0))
    value = total / count if count >= min_samples else None
    within = band(history, signal, sigmas=sigmas, min_windows=min_windows)
    drifting = value is not None and within is not None and harmful(value, within, signal)
    return value, int(count), within, drifting
