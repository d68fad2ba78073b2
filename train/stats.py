"""Statistics over the seeds of a sweep: per-group mean ± standard deviation and paired differences.

A sweep (``--set model=a,b --set seed=0,1,2``) gives one run summary per (group, seed), where a
*group* is everything that names a run except its seed (e.g. the model). This module turns those
summaries into

* :func:`aggregate` — per group and per numeric metric: the per-seed values, their mean and their
  sample standard deviation (``ddof = 1``; 0 for a single seed);
* :func:`paired` — for two groups trained on the same seeds (the same data order, since a run's
  batch order is a pure function of its seed), the per-seed differences ``b − a``, their mean and
  a two-sided confidence interval of the mean difference from the paired t-test
  (:func:`scipy.stats.ttest_rel`, its ``confidence_interval``; Student's t with ``n − 1`` degrees
  of freedom). "Larger than its interval" below means the interval excludes 0.

Summaries are plain dicts as the engine writes them (``summary.json``'s ``runs``), each with a
``seed`` key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95


def _is_number(v) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)


def group_runs(runs: Sequence[dict], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    """Runs by the values of ``keys`` (first-appearance order), each group sorted by seed.

    Raises ValueError when a run has no ``seed`` or a group holds the same seed twice."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if "seed" not in r:
            raise ValueError(f"run summary {dict((k, r.get(k)) for k in keys)} has no 'seed'")
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    for key, rs in groups.items():
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"group {dict(zip(keys, key))} holds seed(s) more than once: {sorted(seeds)}")
        rs.sort(key=lambda r: r["seed"])
    return groups


def describe(values: Sequence[float]) -> dict:
    """``{"mean", "std", "n", "values"}`` of per-seed values (sample std, ``ddof = 1``; 0 for n = 1)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"describe needs a non-empty list of numbers, got {values!r}")
    std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std, "n": int(v.size), "values": [float(x) for x in v]}


def aggregate(runs: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One dict per group: the ``keys``' values, ``seeds`` and, for every numeric metric present in
    all of the group's runs, :func:`describe` of its per-seed values."""
    out = []
    for key, rs in group_runs(runs, keys).items():
        entry = {**dict(zip(keys, key)), "seeds": [r["seed"] for r in rs], "n": len(rs)}
        names = [k for k in rs[0] if k not in keys and k != "seed" and all(_is_number(r.get(k)) for r in rs)]
        for k in names:
            entry[k] = describe([r[k] for r in rs])
        out.append(entry)
    return out


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean of ``b − a`` over paired values, its standard deviation and the paired-t confidence
    interval (``ci`` is None for fewer than 2 pairs; ``(d, d)`` when every difference is ``d``)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values need two lists of the same non-zero length, got {a.shape} and "
                         f"{b.shape}")
    d = b - a
    out = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if d.size > 1 else 0.0, "n": int(d.size),
           "differences": [float(x) for x in d], "ci": None, "p_value": None, "confidence": confidence}
    if d.size >= 2:
        if np.ptp(d) == 0:  # no spread: the t statistic is undefined, the interval is the point
            out["ci"] = (float(d[0]), float(d[0]))
        else:
            res = stats.ttest_rel(b, a)
            ci = res.confidence_interval(confidence_level=confidence)
            out["ci"] = (float(ci.low), float(ci.high))
            out["p_value"] = float(res.pvalue)
    return out


def paired(runs: Sequence[dict], keys: Sequence[str], metric: str,
           confidence: float = CONFIDENCE) -> list[dict]:
    """Every pair of groups ``(a, b)`` with ``a`` listed before ``b`` and at least 2 seeds in common:
    :func:`paired_difference` of ``metric`` (``b − a``) over the common seeds, with ``a``, ``b``
    (the groups' key values), ``seeds`` and ``excludes_zero`` (the interval lies on one side of 0)."""
    groups = [(k, {r["seed"]: r for r in rs}) for k, rs in group_runs(runs, keys).items()]
    out = []
    for i, (ka, ra) in enumerate(groups):
        for kb, rb in groups[i + 1:]:
            seeds = sorted(s for s in set(ra) & set(rb)
                           if _is_number(ra[s].get(metric)) and _is_number(rb[s].get(metric)))
            if len(seeds) < 2:
                continue
            diff = paired_difference([ra[s][metric] for s in seeds], [rb[s][metric] for s in seeds],
                                     confidence)
            ci = diff["ci"]
            out.append({"metric": metric, "a": dict(zip(keys, ka)), "b": dict(zip(keys, kb)), "seeds": seeds,
                        **diff, "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)})
    return out


def mean_std(d: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``"m ± s"`` of a :func:`describe` dict times ``scale`` (just ``"m"`` for one seed)."""
    m = f"{scale * d['mean']:.{digits}f}"
    return m if d["n"] == 1 else f"{m} ± {scale * d['std']:.{digits}f}"


def per_seed(d: dict, scale: float = 1.0, digits: int = 2) -> str:
    return ", ".join(f"{scale * v:.{digits}f}" for v in d["values"])


def paired_table(pairs: list[dict], label, scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """A markdown table of :func:`paired` results; ``label(group_dict) -> str``."""
    if not pairs:
        return ""
    pct = f"{round(100 * pairs[0]['confidence'])}%"
    lines = [f"| difference ({pairs[0]['metric']}{unit}) | seeds | mean difference | {pct} interval | "
             "interval excludes 0 |", "|---|---|---|---|---|"]
    for p in pairs:
        ci = p["ci"]
        lines.append(f"| {label(p['b'])} − {label(p['a'])} | {len(p['seeds'])} | "
                     f"{scale * p['mean']:+.{digits}f} | "
                     f"[{scale * ci[0]:+.{digits}f}, {scale * ci[1]:+.{digits}f}] "
                     f"| {'yes' if p['excludes_zero'] else 'no'} |")
    return "\n".join(lines)


def summary(runs: Sequence[dict], keys: Sequence[str], metrics: Sequence[str]) -> dict:
    """What ``summary.json`` holds: the ``runs``, their :func:`aggregate` and, per metric of
    ``metrics``, the :func:`paired` comparisons."""
    return {"runs": list(runs), "group_keys": list(keys), "aggregate": aggregate(runs, keys),
            "paired": [p for m in metrics for p in paired(runs, keys, m)]}
