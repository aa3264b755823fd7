"""Benchmarks: every method on the same task, same splits, model, epochs and space (DESIGN.md section 4)."""

from .harness import GPU_TASKS, QUICK, TASKS, load_task, run_bench

__all__ = ["GPU_TASKS", "QUICK", "TASKS", "load_task", "run_bench"]
