"""Summaries of timed samples: median and spread, percentiles. Standard library only (peer workers use it too)."""

from __future__ import annotations

import math
import statistics


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile q (0-100) of `values`; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(samples: list[float]) -> dict:
    """Median, mean, min / max, the 5-95 and 25-75 percentile ranges and p99 of `samples` (kept too)."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "median": statistics.median(samples),
        "mean": statistics.fmean(samples),
        "min": min(samples),
        "max": max(samples),
        "p5": percentile(samples, 5),
        "p25": percentile(samples, 25),
        "p75": percentile(samples, 75),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "samples": list(samples),
    }


def rate_summary(units: float, seconds: list[float]) -> dict:
    """Throughput figures (units / s) from the timed samples, summarized like `summarize`."""
    return summarize([units / s for s in seconds if s > 0])


def relative_spread(summary: dict) -> float:
    """(p75 - p25) / median: the interquartile range as a share of the median."""
    if not summary.get("n") or not summary.get("median"):
        return float("nan")
    return (summary["p75"] - summary["p25"]) / summary["median"]


def one_line(text: str, limit: int = 300) -> str:
    """The line of an error message worth showing in a table: for a traceback, what precedes it and its last line."""
    marker = "Traceback (most recent call last)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    if marker in text:
        head = text.split(marker)[0].strip().rstrip(":")
        line = f"{head}: {lines[-1]}" if head else lines[-1]
    else:
        line = lines[0]
    return line[:limit]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
