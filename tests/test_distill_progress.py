"""What a stage shows while it works before its first training step."""

from __future__ import annotations

from test_distill_helpers import debug_config, run


def test_the_ode_stage_shows_its_teacher_trajectories_being_sampled(tmp_path, capsys):
    """The ode stage samples its teacher's trajectories before it trains (tiny-avatar: 256 of 48
    guided steps, minutes on a CPU) and showed nothing meanwhile: a run that looked hung. A bar
    counts them, shown where the training's bar is (run.progress)."""
    run(debug_config("teacher", tmp_path / "teacher"))
    teacher = tmp_path / "teacher" / "model"
    capsys.readouterr()
    run(debug_config("ode", tmp_path / "ode", teacher=teacher, init=teacher, **{"run.progress": True}))
    err = capsys.readouterr().err
    assert "ode: teacher trajectories: 100%" in err and "4/4" in err, err
    run(debug_config("ode", tmp_path / "quiet", teacher=teacher, init=teacher))  # (progress: false)
    assert "trajectories" not in capsys.readouterr().err
