"""Offline training and distillation jobs (teacher, ODE init, Self-Forcing, chunk distillation)."""
