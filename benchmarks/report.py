"""Summaries, tables and plots shared by the simulator, the load generator and `preble-bench compare`.

A *record* is one request's outcome, a dict with (at least) these keys, times in seconds:
``id, start, end, ttft, latency, prompt_tokens, cached_tokens, output_tokens, error``; ttft/latency/end are
None for a failed request; cached_tokens is None when the server did not report it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Column order of summaries / tables: (key, header, format).
COLUMNS: list[tuple[str, str, str]] = [
    ("label", "policy", "{}"),
    ("rate", "rate/s", "{:g}"),
    ("requests", "reqs", "{:d}"),
    ("errors", "err", "{:d}"),
    ("latency_avg", "lat avg s", "{:.3f}"),
    ("latency_p50", "lat p50 s", "{:.3f}"),
    ("latency_p99", "lat p99 s", "{:.3f}"),
    ("ttft_avg", "TTFT avg s", "{:.3f}"),
    ("ttft_p99", "TTFT p99 s", "{:.3f}"),
    ("hit_rate", "hit rate", "{:.3f}"),
    ("imbalance", "imbalance", "{:.2f}"),
    ("throughput_rps", "req/s", "{:.2f}"),
    ("throughput_tps", "out tok/s", "{:.0f}"),
    ("wall_s", "wall s", "{:.1f}"),
]


def _pct(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(records: Sequence[dict[str, Any]], *, duration: float | None = None) -> dict[str, Any]:
    """avg/p50/p99 latency, avg/p99 TTFT, hit rate (sum cached / sum prompt over requests that report it),
    errors, throughput (ok requests and output tokens per second of the run: first start to last end)."""
    ok = [r for r in records if not r.get("error")]
    lat = np.array([r["latency"] for r in ok if r.get("latency") is not None], dtype=float)
    ttft = np.array([r["ttft"] for r in ok if r.get("ttft") is not None], dtype=float)
    with_cache = [r for r in ok if r.get("cached_tokens") is not None and r.get("prompt_tokens")]
    prompt_sum = sum(r["prompt_tokens"] for r in with_cache)
    cached_sum = sum(r["cached_tokens"] for r in with_cache)
    if duration is None:
        starts = [r["start"] for r in records if r.get("start") is not None]
        ends = [r["end"] for r in ok if r.get("end") is not None]
        duration = (max(ends) - min(starts)) if starts and ends else 0.0
    out_tokens = sum(r.get("output_tokens") or 0 for r in ok)
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "latency_avg": float(lat.mean()) if len(lat) else None,
        "latency_p50": _pct(lat, 50),
        "latency_p99": _pct(lat, 99),
        "ttft_avg": float(ttft.mean()) if len(ttft) else None,
        "ttft_p50": _pct(ttft, 50),
        "ttft_p99": _pct(ttft, 99),
        "hit_rate": (cached_sum / prompt_sum) if prompt_sum else None,
        "prompt_tokens": int(sum(r.get("prompt_tokens") or 0 for r in records)),
        "cached_tokens": int(cached_sum),
        "output_tokens": int(out_tokens),
        "duration_s": float(duration),
        "throughput_rps": len(ok) / duration if duration > 0 else None,
        "throughput_tps": out_tokens / duration if duration > 0 else None,
    }


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":"), default=_json_default) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# ---------------------------------------------------------------------------------------------- tables
def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def table_rows(summaries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    present = [c for c in COLUMNS if any(s.get(c[0]) is not None for s in summaries)]
    headers = [h for _, h, _ in present]
    rows = [[_fmt(s.get(k), f) for k, _, f in present] for s in summaries]
    return headers, rows


def render_table(summaries: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """A plain-text table (what gets written to table.txt; the terminal gets the rich version)."""
    headers, rows = table_rows(summaries)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)
    return "\n".join(lines)


def print_table(summaries: Sequence[dict[str, Any]], title: str | None = None) -> None:
    """Print with rich when available, else plain text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(render_table(summaries, title))
        return
    headers, rows = table_rows(summaries)
    t = Table(title=title)
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=max(160, console.width))
    console.print(t)


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency_cdf(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path, *, title: str = "",
                     key: str = "latency") -> Path:
    """One CDF curve per label (e.g. per policy) of the records' `key` (latency or ttft)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, records in runs.items():
        vals = np.sort([r[key] for r in records if not r.get("error") and r.get(key) is not None])
        if len(vals) == 0:
            continue
        ax.plot(vals, np.arange(1, len(vals) + 1) / len(vals), label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"{key} (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title or f"{key} CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_latency_vs_rate(summaries: Sequence[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Average and p99 latency against the request rate, one line per label."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = sorted({s["label"] for s in summaries}, key=lambda x: [s["label"] for s in summaries].index(x))
    for label in labels:
        pts = sorted((s["rate"], s.get("latency_avg"), s.get("latency_p99")) for s in summaries
                     if s["label"] == label and s.get("latency_avg") is not None)
        if not pts:
            continue
        rates = [p[0] for p in pts]
        axes[0].plot(rates, [p[1] for p in pts], marker="o", label=label)
        axes[1].plot(rates, [p[2] for p in pts], marker="o", label=label)
    for ax, what in zip(axes, ("average", "p99")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{what} latency (s)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title or "latency vs rate")
    return _save(plt, fig, path)


def write_report(out_dir: str | Path, summaries: Sequence[dict[str, Any]],
                 runs: dict[tuple[str, float], Sequence[dict[str, Any]]], *, title: str = "",
                 plots: bool = True) -> list[Path]:
    """summary.json, table.txt, and (plots) latency/TTFT CDFs per rate and latency-vs-rate if several rates.

    runs maps (label, rate) to that run's records; the records themselves are written by the caller.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    write_json(list(summaries), out / "summary.json")
    (out / "table.txt").write_text(render_table(summaries, title) + "\n")
    written += [out / "summary.json", out / "table.txt"]
    if not plots:
        return written
    rates = sorted({rate for _, rate in runs})
    for rate in rates:
        by_label = {label: recs for (label, r), recs in runs.items() if r == rate}
        suffix = f"_rate{rate:g}" if len(rates) > 1 else ""
        written.append(plot_latency_cdf(by_label, out / f"latency_cdf{suffix}.png",
                                        title=f"{title} latency CDF @ {rate:g} req/s".strip()))
        written.append(plot_latency_cdf(by_label, out / f"ttft_cdf{suffix}.png", key="ttft",
                                        title=f"{title} TTFT CDF @ {rate:g} req/s".strip()))
    if len(rates) > 1:
        written.append(plot_latency_vs_rate(summaries, out / "latency_vs_rate.png", title=title))
    return written
