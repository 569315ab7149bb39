"""Evaluation: multiple-choice video QA, V-NIAH, lmms-eval wrapper, memory profiling."""
