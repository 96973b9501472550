"""Velocity networks v(x, t, label): typed spec, registry, builders and their parameter/MAC counts."""

from pipeline.nets.counting import count_macs, count_params
from pipeline.nets.registry import NETS, build_net
from pipeline.nets.spec import NetSpec

__all__ = ["NETS", "NetSpec", "build_net", "count_macs", "count_params"]
