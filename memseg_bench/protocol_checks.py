"""Does a protocol measure anything? Three checks on finished runs, computed by `memseg report`:

- plateau: every supervised run's validation mIoU gains less than `plateau_max_gain` points over
  the last fifth of its schedule (the run converged; a rising curve means it stopped early);
- headroom: supervised with all labels beats supervised at the lowest label count by at least
  `min_headroom` points (labels matter, so there is something for unlabeled data to recover);
- gain: at the lowest label count, memseg − supervised is at least `min_gain` points with a paired
  95% interval above 0, and memseg is above selftrain.
"""

from __future__ import annotations

import math
from pathlib import Path

from memseg_bench.config import ReportConfig

LAST_PART = 0.2  # the last fifth of the schedule


def last_part_gain(curve: dict, part: float = LAST_PART) -> dict | None:
    """Validation mIoU (points) at the last validated step minus at the first validated step of
    the last `part` of the schedule; None when fewer than two validations fall there."""
    points = [
        (step, value)
        for step, value in zip(curve["step"], curve.get("val_miou", []), strict=False)
        if math.isfinite(value)
    ]
    if not points:
        return None
    end = points[-1][0]
    window = [(s, v) for s, v in points if s >= (1 - part) * end]
    if len(window) < 2:
        return None
    (start, first), (_, last) = window[0], window[-1]
    return {"from_step": int(start), "to_step": int(end), "gain": float(100 * (last - first))}


def _curve(curves_dir: Path, run: str) -> dict | None:
    from memseg_bench.figures import read_curve

    path = curves_dir / f"{run}.csv"
    return read_curve(path) if path.is_file() else None


def protocol_checks(main: dict, curves_dir: Path, limits: ReportConfig) -> dict:
    """The checks for one protocol from its main-table data (cells and paired gains)."""
    cells, gains = main["cells"], main["gain"]
    supervised = cells.get("supervised", {})
    counts = sorted(supervised)
    checks: dict = {}
    plateau = {}
    for n in counts:
        for run in supervised[n]["runs"]:
            curve = _curve(curves_dir, run)
            plateau[run] = None if curve is None else last_part_gain(curve)
    measured = [p["gain"] for p in plateau.values() if p is not None]
    if plateau:
        checks["plateau"] = {
            "runs": plateau,
            "max_gain": max(measured) if measured else None,
            "limit": limits.plateau_max_gain,
            "passed": bool(measured)
            and len(measured) == len(plateau)
            and max(measured) < limits.plateau_max_gain,
        }
    if len(counts) >= 2:
        low, full = counts[0], counts[-1]
        headroom = supervised[full]["mean"] - supervised[low]["mean"]
        checks["headroom"] = {
            "low_n": low,
            "full_n": full,
            "points": headroom,
            "limit": limits.min_headroom,
            "passed": headroom >= limits.min_headroom,
        }
    low = counts[0] if counts else None
    control = positive_control(gains, low, limits.min_gain)
    if control is not None:
        checks["positive_control"] = control
    over_sup = gains.get("memseg − supervised", {}).get(low)
    over_self = gains.get("memseg − selftrain", {}).get(low)
    if over_sup is not None:
        interval = over_sup["interval95"]
        checks["gain"] = {
            "n_labeled": low,
            "memseg_minus_supervised": over_sup["value"],
            "interval95": interval,
            "pairs": over_sup["n"],
            "memseg_minus_selftrain": None if over_self is None else over_self["value"],
            "memseg_minus_selftrain_interval95": None
            if over_self is None
            else over_self["interval95"],
            "limit": limits.min_gain,
            "passed": over_sup["value"] >= limits.min_gain
            and interval is not None
            and interval[0] > 0
            and over_self is not None
            and over_self["value"] > 0,
        }
    return checks


CONTROLS = ("fixmatch", "unimatch")


def positive_control(gains: dict, n_labeled: int | None, limit: float) -> dict | None:
    """The better of the controls (fixmatch, unimatch) against supervised at the low label count:
    a protocol measures semi-supervised learning only if it gains >= limit points with a paired
    95% interval above 0. None when no control ran."""
    measured = {
        method: gains[f"{method} − supervised"][n_labeled]
        for method in CONTROLS
        if n_labeled in gains.get(f"{method} − supervised", {})
    }
    if not measured:
        return None
    best = max(measured, key=lambda method: measured[method]["value"])
    gain = measured[best]
    interval = gain["interval95"]
    return {
        "n_labeled": n_labeled,
        "method": best,
        "minus_supervised": gain["value"],
        "interval95": interval,
        "pairs": gain["n"],
        "others": {m: g["value"] for m, g in measured.items() if m != best},
        "limit": limit,
        "passed": gain["value"] >= limit and interval is not None and interval[0] > 0,
    }


def _interval(interval) -> str:
    if interval is None:
        return "no interval (one pair)"
    return f"95% interval [{interval[0]:+.1f}, {interval[1]:+.1f}]"


def describe(checks: dict) -> list[str]:
    """One line per check, as `memseg report` prints them and the README shows them."""
    lines = []
    plateau = checks.get("plateau")
    if plateau:
        verdict = "pass" if plateau["passed"] else "FAIL"
        worst = plateau["max_gain"]
        shown = "no validation curve" if worst is None else f"at most {worst:+.1f} points"
        lines.append(
            f"plateau ({verdict}): supervised validation mIoU over the last fifth of the schedule "
            f"moves {shown} (limit < {plateau['limit']:g}), {len(plateau['runs'])} runs"
        )
    headroom = checks.get("headroom")
    if headroom:
        verdict = "pass" if headroom["passed"] else "FAIL"
        lines.append(
            f"headroom ({verdict}): supervised {headroom['full_n']} labels − "
            f"{headroom['low_n']} labels = {headroom['points']:+.1f} points "
            f"(limit ≥ {headroom['limit']:g})"
        )
    control = checks.get("positive_control")
    if control:
        verdict = "pass" if control["passed"] else "FAIL"
        others = "".join(f"; {m} − supervised {v:+.1f}" for m, v in control["others"].items())
        lines.append(
            f"positive control ({verdict}): at {control['n_labeled']} labels "
            f"{control['method']} − supervised {control['minus_supervised']:+.1f} points, "
            f"{_interval(control['interval95'])} over {control['pairs']} "
            f"draw{'s' if control['pairs'] != 1 else ''} (limit ≥ {control['limit']:g}, "
            f"interval above 0){others}"
        )
    gain = checks.get("gain")
    if gain:
        verdict = "pass" if gain["passed"] else "FAIL"
        versus_self = gain["memseg_minus_selftrain"]
        self_text = (
            "no selftrain runs"
            if versus_self is None
            else (
                f"memseg − selftrain {versus_self:+.1f}, "
                f"{_interval(gain['memseg_minus_selftrain_interval95'])}"
            )
        )
        lines.append(
            f"gain ({verdict}): at {gain['n_labeled']} labels memseg − supervised "
            f"{gain['memseg_minus_supervised']:+.1f} points, {_interval(gain['interval95'])} "
            f"over {gain['pairs']} seed{'s' if gain['pairs'] != 1 else ''} "
            f"(limit ≥ {gain['limit']:g}, interval above 0); "
            f"{self_text}"
        )
    return lines
