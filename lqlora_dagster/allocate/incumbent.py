"""A plan within a hair of the optimum, in milliseconds, to cut HiGHS's search short.

The bit allocation is a multiple-choice knapsack. Its LP relaxation is solved greedily:
each matrix starts at its cheapest candidate and climbs the lower convex hull of its
(storage, error) candidates, the whole model's upgrades taken in order of error saved per
bit while they fit (a matrix whose next step does not fit stops climbing). That is the
LP optimum with its one fractional upgrade left out, topped up where bits remain: a
feasible plan whose total error sits, on these tables, within about 1e-6 (relative) of
the ILP's. Given its value as an objective bound, HiGHS prunes almost its whole search
tree at once instead of spending seconds finding such a plan by its own heuristics; it
still proves optimality itself (`ilp.py`).
"""

import pandas as pd

from lqlora_dagster.allocate.problem import total_numel


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(storage, error) points sorted by storage, error falling: the lower convex hull."""
    hull: list[tuple[float, float]] = []
    for p in points:
        if hull and p[1] >= hull[-1][1]:
            continue  # costs more bits for no less error
        while len(hull) >= 2:
            (s1, e1), (s2, e2) = hull[-2], hull[-1]
            if (e2 - e1) * (p[0] - s1) >= (p[1] - e1) * (s2 - s1):  # hull[-1] is on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def greedy_total_error(front: pd.DataFrame, budget: float) -> float | None:
    """Total error of the greedy plan over `front` (candidates with `storage_bits` and
    `error`) at `budget` bits/param, or None when not even the cheapest plan fits."""
    capacity = budget * total_numel(front)
    hulls = [
        _lower_hull(sorted(zip(group["storage_bits"].astype(float), group["error"].astype(float))))
        for _, group in front.groupby("matrix", sort=False)
    ]
    used = sum(hull[0][0] for hull in hulls)
    if used > capacity:
        return None
    # (error saved per bit, matrix, its step): a matrix's steps save less and less per bit,
    # so in this order each matrix's steps come in its own order
    steps = sorted(
        ((e1 - e2) / (s2 - s1), i, k)
        for i, hull in enumerate(hulls)
        for k, ((s1, e1), (s2, e2)) in enumerate(zip(hull, hull[1:]), 1)
    )
    level = [0] * len(hulls)  # the hull point each matrix is at
    stopped: set[int] = set()
    for _, i, k in reversed(steps):
        if i in stopped:
            continue
        extra = hulls[i][k][0] - hulls[i][k - 1][0]
        if used + extra <= capacity:
            used += extra
            level[i] = k
        else:
            stopped.add(i)  # its later steps need this one
    return sum(hull[k][1] for hull, k in zip(hulls, level))
