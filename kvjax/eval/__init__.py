"""Offline evaluation: task prompts and scoring (spec ALGORITHMS.md §6)."""

from kvjax.eval.tasks import TASKS, Sample, default_data_dir, default_haystack_path, make_sample, score

__all__ = ["TASKS", "Sample", "default_data_dir", "default_haystack_path", "make_sample", "score"]
