"""The debug teacher and its ODE-initialised student that the distill stage tests train from."""

from __future__ import annotations

from test_distill_helpers import debug_config, run


def train_pipeline(root):
    """A debug teacher and its ODE-initialised student (each a few steps), trained under root."""
    run(debug_config("teacher", root / "teacher"))
    teacher = root / "teacher" / "model"
    run(debug_config("ode", root / "ode", teacher=teacher, init=teacher))
    return {"teacher": teacher, "student": root / "ode" / "model", "root": root}


def stage_config(stage, out, pipeline, **edits):
    """The stage's debug config against the pipeline's teacher, started from the teacher (ode) or the student."""
    init = pipeline["teacher"] if stage == "ode" else pipeline["student"]
    return debug_config(stage, out, teacher=pipeline["teacher"], init=init, **edits)
