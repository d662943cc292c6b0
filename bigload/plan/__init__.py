"""Deciding: what a model holds (inventory), what a machine has (budgets) and where everything goes (plan).

Every decision of a load is made here and carried in a frozen `Plan`; `bigload.load` and `bigload.runtime`
only execute it. The planner itself is pure (`planner`, `reserve`, `hosts`, `accelerate_map`); `budget`
is the one module here that probes the machine, and its result is passed in.
"""

from bigload.plan.given import check_plan, plan_for_map
from bigload.plan.planner import (
    STRATEGIES,
    DeviceUsage,
    Placement,
    Plan,
    PlanOptions,
    choose_policy,
    default_gpu_headroom,
    plan,
)

__all__ = ["STRATEGIES", "DeviceUsage", "Placement", "Plan", "PlanOptions", "check_plan", "choose_policy",
           "default_gpu_headroom", "plan", "plan_for_map"]
