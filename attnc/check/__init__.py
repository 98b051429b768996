"""Checks against the original: numerical fidelity, task-level metrics, speed."""
