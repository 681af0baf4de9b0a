"""Arrival processes, seeded: Poisson, bursty (gamma renewal with a CV), and an Azure-LLM-trace shape.

All functions return n increasing arrival times in seconds, starting near 0, with the asked mean rate
(requests per second, across the whole cluster).

- ``poisson``: exponential gaps (CV 1).
- ``gamma``: gamma-distributed gaps with coefficient of variation ``cv`` (cv > 1: bursty; cv < 1: regular).
- ``azure``: the shape of the Azure LLM inference trace 2023 without the file (no download here): a slow
  sinusoidal swing (one period over the run unless ``period_s``), log-normal AR(1) rate noise per
  ``bin_s`` bins (bursts lasting seconds), and rare spikes, normalized to the mean rate; counts per bin
  are Poisson. ``azure_csv`` replays a real trace file instead (e.g. AzureLLMInferenceTrace_code.csv,
  column TIMESTAMP), time-compressed by ``time_scale`` (the paper uses x0.7), optionally re-scaled to
  a target mean rate.
"""

from __future__ import annotations

import csv
import math
from datetime import datetime
from pathlib import Path

import numpy as np

ARRIVALS = ("poisson", "gamma", "azure")


def poisson(n: int, rate: float, seed: int = 0) -> np.ndarray:
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = np.random.default_rng([seed, 0x504F49])
    return np.cumsum(rng.exponential(1.0 / rate, n))


def gamma(n: int, rate: float, cv: float = 2.0, seed: int = 0) -> np.ndarray:
    """Gamma renewal process: gaps ~ Gamma(shape=1/cv^2, scale=cv^2/rate), mean gap 1/rate."""
    if rate <= 0 or cv <= 0:
        raise ValueError("rate and cv must be > 0")
    rng = np.random.default_rng([seed, 0x47414D])
    shape = 1.0 / cv**2
    return np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), n))


def azure_rate_curve(duration_s: float, rate: float, *, seed: int = 0, bin_s: float = 1.0,
                     period_s: float | None = None, swing: float = 0.5, burst_sigma: float = 0.6,
                     burst_corr: float = 0.9, spike_prob: float = 0.01, spike_factor: float = 4.0) -> np.ndarray:
    """Rate per bin (req/s) over duration_s, mean `rate`: swing x AR(1) log-normal bursts x spikes."""
    rng = np.random.default_rng([seed, 0x415A55])
    nbins = max(1, math.ceil(duration_s / bin_s))
    t = (np.arange(nbins) + 0.5) * bin_s
    period = period_s or max(duration_s, bin_s)
    diurnal = 1.0 + swing * np.sin(2 * np.pi * t / period - np.pi / 2)  # starts low, peaks mid-period
    x = np.empty(nbins)
    x[0] = rng.normal(0, burst_sigma)
    eps = rng.normal(0, burst_sigma * math.sqrt(1 - burst_corr**2), nbins)
    for i in range(1, nbins):
        x[i] = burst_corr * x[i - 1] + eps[i]
    spikes = np.where(rng.random(nbins) < spike_prob, spike_factor, 1.0)
    spikes = np.maximum(spikes, np.roll(spikes, 1))  # a spike lasts two bins
    curve = diurnal * np.exp(x) * spikes
    return curve * (rate / curve.mean())


def azure(n: int, rate: float, seed: int = 0, *, bin_s: float = 1.0, period_s: float | None = None,
          **curve_kw: float) -> np.ndarray:
    """n arrivals following a synthetic Azure-trace-shaped rate curve with mean `rate`."""
    if rate <= 0:
        raise ValueError("rate must be > 0")
    rng = np.random.default_rng([seed, 0x415A56])
    duration = n / rate
    times: list[np.ndarray] = []
    got = 0
    attempt = 0
    while got < n:
        curve = azure_rate_curve(duration, rate, seed=seed + attempt, bin_s=bin_s, period_s=period_s, **curve_kw)
        counts = rng.poisson(curve * bin_s)
        starts = np.repeat(np.arange(len(curve)) * bin_s, counts) + (duration * attempt)
        ts = np.sort(starts + rng.random(counts.sum()) * bin_s)
        times.append(ts)
        got += len(ts)
        attempt += 1
    return np.concatenate(times)[:n]


def _parse_time(value: str) -> float:
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    # Azure traces: "2023-11-16 18:15:46.6805900" (7 fractional digits: trim to microseconds).
    head, dot, frac = value.partition(".")
    if dot:
        value = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(value).timestamp()


def azure_csv(path: str | Path, n: int, *, time_scale: float = 0.7, rate: float | None = None,
              column: str | None = None) -> np.ndarray:
    """Arrivals from a trace CSV (a TIMESTAMP-like column: ISO datetimes or seconds), relative to the first.

    Times are multiplied by time_scale (0.7 compresses by 30%, as the paper does); with `rate`, they are
    re-scaled so the mean rate of the first n arrivals is `rate`. A trace shorter than n is repeated.
    """
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty CSV")
        col = column or next((c for c in reader.fieldnames if c.strip().lower() in
                              ("timestamp", "time", "arrival", "arrival_time", "ts")), reader.fieldnames[0])
        raw = np.array(sorted(_parse_time(row[col]) for row in reader if row.get(col)))
    if len(raw) == 0:
        raise ValueError(f"{path}: no timestamps in column {col!r}")
    rel = raw - raw[0]
    if len(rel) < n:  # repeat the trace back to back, one mean gap apart
        span = rel[-1] + (rel[-1] / max(1, len(rel) - 1) if len(rel) > 1 else 1.0)
        reps = math.ceil(n / len(rel))
        rel = np.concatenate([rel + k * span for k in range(reps)])
    rel = rel[:n] * time_scale
    if rate is not None and n > 1 and rel[-1] > 0:
        rel = rel * ((n - 1) / rate) / rel[-1]
    return rel


def make_arrivals(kind: str, n: int, rate: float, seed: int = 0, *, cv: float = 2.0,
                  trace: str | Path | None = None, time_scale: float = 0.7) -> np.ndarray:
    """Dispatch by name: poisson | gamma (cv) | azure (synthetic, or trace=CSV to replay a file)."""
    kind = kind.lower()
    if trace is not None:
        return azure_csv(trace, n, time_scale=time_scale, rate=rate)
    if kind == "poisson":
        return poisson(n, rate, seed)
    if kind in ("gamma", "bursty"):
        return gamma(n, rate, cv, seed)
    if kind == "azure":
        return azure(n, rate, seed)
    raise ValueError(f"unknown arrival process {kind!r}; choose from {', '.join(ARRIVALS)}")


def cv_of(times: np.ndarray) -> float:
    """Coefficient of variation of the gaps (1 for Poisson)."""
    gaps = np.diff(np.asarray(times))
    return float(gaps.std() / gaps.mean()) if len(gaps) > 1 and gaps.mean() > 0 else 0.0
