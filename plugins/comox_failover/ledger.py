"""What cloud failover spends, against every budget that applies, in
``gateway.shared_state`` (so every replica sharing it counts together).

Two counters per budget and period, in nano-dollars:

* ``budget:<scope>:<period>`` — *committed*: spent plus reserved. A request
  reserves its worst-case cost here with a capped ``add`` before it goes to
  the cloud, so requests in flight together can never be promised more than
  the budget; the cap is the budget.
* ``budget:<scope>:<period>:spent`` — what settled requests really cost.

Scopes: ``day`` (``budget:day:2026-12-01``, UTC), ``month``
(``budget:month:2026-12``) and one per key (``budget:key:<key id>:day:…``).
Reserved = committed − spent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from comox import Principal, SharedState

from .config import NANO, BudgetSettings

__all__ = ["Budget", "Hold", "Ledger", "usd"]

log = logging.getLogger("comox.failover")

DAY_TTL_S = 3 * 86400.0
MONTH_TTL_S = 62 * 86400.0


def usd(nano: float) -> float:
    return round(nano / NANO, 9)


def _nano(dollars: Any) -> int | None:
    if isinstance(dollars, (int, float)) and not isinstance(dollars, bool) and dollars >= 0:
        return round(dollars * NANO)
    return None


class Budget(NamedTuple):
    """One budget a request counts against."""

    scope: str  # "day", "month" or "key"
    period: str
    key_id: str | None
    cap: int | None  # nano-dollars; None: counted, not limited
    counter: str
    ttl_s: float


class Hold:
    """A request's reservation: ``amount`` nano-dollars on each of ``budgets``."""

    __slots__ = ("budgets", "amount", "open")

    def __init__(self, budgets: list[Budget], amount: int):
        self.budgets = budgets
        self.amount = amount
        self.open = True


class Ledger:
    """Budgets of one gateway. ``clock`` gives the wall-clock time the UTC day
    and month are taken from."""

    def __init__(self, state: SharedState, settings: BudgetSettings, clock: Callable[[], float] = time.time):
        self.state = state
        self.day_cap = _nano(settings.cloud_usd_per_day)
        self.month_cap = _nano(settings.cloud_usd_per_month)
        self.clock = clock
        self.keys: dict[str, dict[str, float | None]] = {}  # day → key id → its limit in USD, as seen here

    def budgets(self, principal: Principal) -> list[Budget]:
        """The budgets a request of ``principal`` counts against, now."""
        now = time.gmtime(self.clock())
        day, month = time.strftime("%Y-%m-%d", now), time.strftime("%Y-%m", now)
        out = [Budget("day", day, None, self.day_cap, f"budget:day:{day}", DAY_TTL_S),
               Budget("month", month, None, self.month_cap, f"budget:month:{month}", MONTH_TTL_S)]
        key_id = principal.key_id
        if key_id is not None:
            limit = principal.limits.get("cloud_usd_per_day")
            out.append(Budget("key", day, key_id, _nano(limit), f"budget:key:{key_id}:day:{day}", DAY_TTL_S))
        return out

    async def reserve(self, budgets: list[Budget], amount: int) -> Hold | Budget:
        """Reserve ``amount`` on every one of ``budgets``, all or none: the
        :class:`Hold`, or the first budget it does not fit."""
        capped = [budget for budget in budgets if budget.cap is not None]
        if capped and self.state.readiness().get("state") == "degraded":
            # The shared counters are out of reach: each replica would count
            # from zero, and hard budgets could be overspent. Refuse instead.
            log.warning("cloud failover refused: budgets are set and the shared state is degraded")
            return capped[0]
        taken: list[Budget] = []
        for budget in budgets:
            added, _ = await self.state.add(budget.counter, amount, cap=budget.cap, ttl_s=budget.ttl_s)
            if not added:
                for undo in taken:
                    await self.state.add(undo.counter, -amount, ttl_s=undo.ttl_s)
                return budget
            taken.append(budget)
        for budget in budgets:
            if budget.key_id is not None:
                await self._remember(budget)
        return Hold(budgets, amount)

    async def settle(self, hold: Hold, cost: int | None) -> None:
        """Turn ``hold`` into spend: the answer cost ``cost`` nano-dollars
        (None: unknown, so the whole reservation is charged). Once only."""
        if not hold.open:
            return
        hold.open = False
        charged = hold.amount if cost is None else cost
        for budget in hold.budgets:
            if charged:
                await self.state.add(budget.counter + ":spent", charged, ttl_s=budget.ttl_s)
            if charged != hold.amount:
                await self.state.add(budget.counter, charged - hold.amount, ttl_s=budget.ttl_s)

    async def release(self, hold: Hold) -> None:
        """Give the reservation of a request the cloud did not answer back."""
        await self.settle(hold, 0)

    async def spent(self, budget: Budget) -> float:
        _, value = await self.state.add(budget.counter + ":spent", 0, ttl_s=budget.ttl_s)
        return value

    async def _remember(self, budget: Budget) -> None:
        """Note the key in the day's index of keys (this replica's, and the
        shared one ``/admin/spend`` lists every replica's keys from)."""
        assert budget.key_id is not None
        seen = self.keys.setdefault(budget.period, {})
        limit = usd(budget.cap) if budget.cap is not None else None
        if budget.key_id in seen and seen[budget.key_id] == limit:
            return
        seen[budget.key_id] = limit
        for day in [d for d in self.keys if d != budget.period]:
            del self.keys[day]
        index = f"budget:keys:{budget.period}"
        stored = await self.state.get(index)
        merged = {**(orjson.loads(stored) if stored else {}), **seen}
        await self.state.set(index, orjson.dumps(merged), ttl_s=DAY_TTL_S)

    async def report(self) -> dict[str, Any]:
        """Spend and reservations against every budget, for ``/admin/spend``."""
        budgets = self.budgets(Principal())
        day = budgets[0].period
        stored = await self.state.get(f"budget:keys:{day}")
        keys = {**(orjson.loads(stored) if stored else {}), **self.keys.get(day, {})}
        for key_id, limit in sorted(keys.items()):
            budgets.append(Budget("key", day, key_id, _nano(limit), f"budget:key:{key_id}:day:{day}", DAY_TTL_S))
        rows = []
        for budget in budgets:
            _, committed = await self.state.add(budget.counter, 0, ttl_s=budget.ttl_s)
            spent = await self.spent(budget)
            row: dict[str, Any] = {"budget": budget.scope, "period": budget.period}
            if budget.key_id is not None:
                row["key_id"] = budget.key_id
            row.update({
                "limit_usd": usd(budget.cap) if budget.cap is not None else None,
                "spent_usd": usd(spent),
                "reserved_usd": usd(max(0.0, committed - spent)),
                "remaining_usd": usd(max(0.0, budget.cap - committed)) if budget.cap is not None else None,
            })
            rows.append(row)
        return {"object": "spend", "currency": "USD", "budgets": rows}
