"""Splitting one budget (IOPS or bytes/s) between the cgroups that share it.

cgroup v1 throttling is per cgroup and not hierarchical, so a volume's budget must be cut
into one rule per container cgroup (and per pod, when pods share a volume). A member that
showed no I/O last period keeps a small floor; the active ones share the rest equally.
The sum never exceeds the budget, except when every share is rounded up to 1.
"""

from __future__ import annotations

from collections.abc import Sequence

# An idle member's floor, as a fraction of the budget: enough to start doing I/O before the
# next rebalance notices it, small enough not to take much from the busy members.
IDLE_FLOOR_FRACTION = 0.005


def split_budget(
    budget: int, activity: Sequence[bool | None], idle_floor_fraction: float = IDLE_FLOOR_FRACTION
) -> list[int]:
    """Shares of `budget` (0 = unlimited, then every share is 0 too).

    activity[i] is True (did I/O last period), False (idle) or None (new: not yet seen,
    counted as active so a new container never starts on a floor).
    """
    n = len(activity)
    if budget <= 0 or n == 0:
        return [0] * n
    active = [a is not False for a in activity]
    n_active = sum(active)
    if n_active in (0, n):
        return [max(1, budget // n)] * n
    # Many idle members together never take more than half the budget.
    floor = max(1, min(int(budget * idle_floor_fraction), budget // (2 * n)))
    rest = max(0, budget - floor * (n - n_active))
    share = max(1, rest // n_active)
    return [share if a else floor for a in active]
