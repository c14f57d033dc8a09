"""Fleet state, owned by the core: per backend (:mod:`.state`, with its
measurements in :mod:`.measure` and reported load in :mod:`.load`), per model
group (:mod:`.group`), and the cost formula policies share (:mod:`.cost`).

Routing policies read it through the views in :mod:`comox.views`; health
checks and real requests write it, through the core only.
"""

from .cost import cheaper, power_of_two, request_size
from .group import FleetCounters, ModelGroup
from .load import FAIL, LOADING, OK, HealthReport, LoadReport
from .measure import DECAY_S, DEFAULT_LATENCY_MS, FAILURE_PENALTY_MS
from .state import EJECT_AFTER, EJECT_BASE_S, EJECT_MAX_S, BackendState

__all__ = [
    "BackendState", "FleetCounters", "ModelGroup", "HealthReport", "LoadReport", "OK", "LOADING", "FAIL",
    "cheaper", "power_of_two", "request_size",
    "EJECT_AFTER", "EJECT_BASE_S", "EJECT_MAX_S", "DECAY_S", "DEFAULT_LATENCY_MS", "FAILURE_PENALTY_MS",
]
