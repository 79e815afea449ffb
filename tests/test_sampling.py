"""Rectified-flow schedule math and samplers, checked against an exact-velocity oracle."""

import numpy as np
import pytest
import torch

from streamgen.sampling import (
    add_noise,
    euler_sigmas,
    guided,
    sample_euler,
    sample_few_step,
    shift_sigma,
    student_sigmas,
    x0_from_velocity,
)


def test_shift_formula_and_endpoints():
    assert shift_sigma(0.0, 5.0) == 0.0
    assert shift_sigma(1.0, 5.0) == 1.0
    assert shift_sigma(0.75, 5.0) == pytest.approx(0.9375)
    assert shift_sigma(0.5, 1.0) == 0.5  # shift 1 is the identity
    s = euler_sigmas(50, 5.0)
    assert len(s) == 51 and s[0] == 1 and s[-1] == 0
    assert (s[1:] < s[:-1]).all()


def test_student_lists_match_the_published_warp():
    assert torch.allclose(student_sigmas(4), torch.tensor([1.0, 0.9375, 0.8333, 0.625]), atol=1e-4)
    assert torch.allclose(student_sigmas(2), torch.tensor([1.0, 0.8333]), atol=1e-4)
    assert torch.allclose(student_sigmas(1), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        student_sigmas(0)


def test_noise_and_x0_are_inverse():
    x0, noise = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    sigma = torch.tensor([0.2, 0.9])
    xt = add_noise(x0, noise, sigma)
    assert torch.allclose(x0_from_velocity(xt, noise - x0, sigma), x0, atol=1e-6)


def oracle(x0):
    """The exact velocity of the straight path through x0: v = (x_t - x0) / sigma."""

    def velocity(x, sigma):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return (x - x0) / s.clamp(min=1e-8)

    return velocity


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])  # (odd counts too)
def test_few_step_student_recovers_x0_with_exact_velocity(steps):
    x0 = torch.randn(2, 4, 3, 5, 5)
    noise = torch.randn_like(x0)
    out = sample_few_step(oracle(x0), noise, student_sigmas(steps), torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-5)
    assert torch.allclose(sample_euler(oracle(x0), noise, euler_sigmas(steps)), x0, atol=1e-4)


def test_teacher_euler_recovers_x0_and_a_wrong_velocity_does_not():
    x0 = torch.randn(1, 4, 3, 5, 5)
    noise = torch.randn_like(x0)
    assert torch.allclose(sample_euler(oracle(x0), noise, euler_sigmas(20)), x0, atol=1e-4)
    wrong = sample_euler(oracle(x0 + 1), noise, euler_sigmas(20))
    assert not torch.allclose(wrong, x0, atol=0.5)


def test_classifier_free_guidance_combination():
    cond = lambda x, s: torch.full_like(x, 2.0)
    uncond = lambda x, s: torch.full_like(x, 1.0)
    x, s = torch.zeros(3), torch.ones(1)
    assert torch.allclose(guided(cond, uncond, 5.0)(x, s), torch.full((3,), 6.0))
    assert guided(cond, uncond, 1.0) is cond  # scale 1 skips the unconditional pass


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 50, 1000])
@pytest.mark.parametrize("shift", [0.1, 1.0, 5.0, 100.0])
def test_every_schedule_runs_from_pure_noise_down_in_order(steps, shift):
    """Any step count and positive shift: the teacher's list runs from exactly 1 to exactly 0,
    the student's from exactly 1 down to the shifted 1/steps, each strictly decreasing."""
    euler, student = euler_sigmas(steps, shift), student_sigmas(steps, shift)
    assert len(euler) == steps + 1 and euler[0] == 1 and euler[-1] == 0
    assert len(student) == steps and student[0] == 1
    assert student[-1].item() == pytest.approx(shift_sigma(1 / steps, shift), rel=1e-6)
    for s in (euler, student):
        assert s.dtype == torch.float32 and (s[1:] < s[:-1]).all()
    assert (student > 0).all()


def test_a_one_step_teacher_schedule_is_one_straight_jump_from_noise_to_data():
    assert torch.equal(euler_sigmas(1, 5.0), torch.tensor([1.0, 0.0]))
    x0 = torch.randn(1, 4, 3, 5, 5)
    noise = torch.randn_like(x0)
    # the exact velocity is constant along the straight path: one Euler step lands on x0
    assert torch.allclose(sample_euler(lambda x, s: noise - x0, noise, euler_sigmas(1)), x0, atol=1e-6)
    # at sigma exactly 0 the state is its own x0; at exactly 1 it is the noise
    assert torch.equal(x0_from_velocity(x0, torch.randn_like(x0), 0.0), x0)
    assert torch.equal(add_noise(x0, noise, 1.0), noise) and torch.equal(add_noise(x0, noise, 0.0), x0)




def test_shifts_compose_by_multiplying():
    """shift(shift(s, a), b) == shift(s, a * b): a shift 1/a undoes a, and 1 is the identity."""
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(shift_sigma(shift_sigma(s, 5.0), 3.0), shift_sigma(s, 15.0))
    assert torch.allclose(shift_sigma(shift_sigma(s, 5.0), 1 / 5.0), s)
    assert torch.equal(shift_sigma(s, 1.0), s)


@pytest.mark.parametrize("schedule", [euler_sigmas, student_sigmas])
def test_schedules_refuse_step_counts_and_shifts_that_make_no_schedule(schedule):
    """0 steps sampled nothing (euler_sigmas(0) was [1.0]: the noise came back as the sample),
    -1 steps an empty list, 2.5 steps three levels; shift 0 a NaN level, a negative shift levels
    outside [0, 1]."""
    for steps in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="num_steps"):
            schedule(steps)
    for shift in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="shift"):
            schedule(4, shift)
    assert torch.equal(schedule(np.int64(4), 5), schedule(4, 5.0))  # a numpy count, an int shift


def test_guidance_at_scale_0_and_1_runs_one_branch_only():
    calls = []

    def branch(name, value):
        def velocity(x, s):
            calls.append(name)
            return torch.full_like(x, value)

        return velocity

    cond, uncond = branch("cond", 2.0), branch("uncond", 1.0)
    x, s = torch.zeros(3), torch.ones(1)
    assert torch.equal(guided(cond, uncond, 0.0)(x, s), torch.full((3,), 1.0)) and calls == ["uncond"]
    calls.clear()
    assert torch.equal(guided(cond, uncond, 1.0)(x, s), torch.full((3,), 2.0)) and calls == ["cond"]
    calls.clear()
    assert torch.equal(guided(cond, uncond, -1.0)(x, s), torch.full((3,), 0.0))
    assert sorted(calls) == ["cond", "uncond"]


def test_the_teachers_guidance_at_scale_0_runs_the_unconditional_pass_only(monkeypatch):
    import streamgen.conditioning as conditioning

    class Cond:
        def unconditional(self):
            return "uncond"

    seen = []
    monkeypatch.setattr(conditioning, "sequence_velocity", lambda m, x, t, c: seen.append(c) or x + 1)
    x = torch.zeros(2)
    assert torch.equal(conditioning.guided_velocity(None, x, None, Cond(), 0.0), x + 1)
    assert seen == ["uncond"]
