"""RL algorithms behind one interface (``fdfo.algorithms.base``): ``train.algorithm`` names one.

    fdfo       Finite Difference Flow Optimization (fdfo.algorithms.fdfo)
    flow_grpo  the Flow-GRPO baseline (fdfo.algorithms.flow_grpo)

A new algorithm is one file with an ``Algorithm`` subclass (its ``name``, its ``Settings`` dataclass: the
run config's section of that name), registered below.
"""

from __future__ import annotations

from fdfo.algorithms.base import Algorithm, Batch, Layout, Policy
from fdfo.algorithms.fdfo import FDFO
from fdfo.algorithms.flow_grpo import FlowGRPO
from fdfo.errors import ConfigError

ALGORITHMS: dict[str, type[Algorithm]] = {algorithm.name: algorithm for algorithm in (FDFO, FlowGRPO)}


def get(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ConfigError(f"config key 'train.algorithm' is {name!r}; valid values: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Algorithm", "Batch", "Layout", "Policy", "get"]
