"""Choosing engine instances: the lease-held instance registry and router policies."""

from rtpllm.routing.instances import Instance, InstanceRegistry
from rtpllm.routing.policy import POLICIES, LeastLoaded, RoundRobin, RouteRequest, RouterPolicy, make_policy

__all__ = [
    "POLICIES",
    "Instance",
    "InstanceRegistry",
    "LeastLoaded",
    "RoundRobin",
    "RouteRequest",
    "RouterPolicy",
    "make_policy",
]
