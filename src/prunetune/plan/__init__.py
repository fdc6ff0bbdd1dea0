"""Memory planning: a method's peak training memory predicted from a model's config, no weights loaded."""

from .planner import METHODS, PlanSettings, parse_memory, plan_method, resolve_config

__all__ = ["METHODS", "PlanSettings", "parse_memory", "plan_method", "resolve_config"]
