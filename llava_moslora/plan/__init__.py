"""`llava-moslora plan`: per-GPU memory of a config's run, predicted without allocating weights."""

from .planner import MemoryPlan, build_meta_llava, plan_memory

__all__ = ["MemoryPlan", "build_meta_llava", "plan_memory"]
