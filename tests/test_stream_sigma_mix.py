"""A bf16 student mixes its latents at the exact float32 noise level of its schedule: the sigma
of x_sigma = (1 - sigma) x0 + sigma noise, and of x0 = x_sigma - sigma v, is not rounded to the
latents' dtype first (4 steps at shift 5 have the level 0.8333, 0.8320 in bf16), while the network
sees the latents in its own dtype."""

import torch

from streamgen.sampling import add_noise, fresh_noise, sample_few_step, student_sigmas

BF16 = torch.bfloat16


def mix(x0, noise, sigma: torch.Tensor) -> torch.Tensor:
    """The mix in float32 at `sigma`, rounded to bf16 once, at the end."""
    return ((1 - sigma) * x0.float() + sigma * noise.float()).to(BF16)


def test_add_noise_mixes_bf16_latents_at_the_float32_sigma():
    sigma = student_sigmas(4, 5.0)[2]
    assert sigma.dtype == torch.float32 and sigma.to(BF16).float() != sigma  # (not a bf16 number)
    x0, noise = torch.randn(2, 4, 2, 16, 16, generator=torch.Generator().manual_seed(0)).to(BF16)
    got = add_noise(x0, noise, sigma)
    assert got.dtype == BF16
    assert torch.equal(got, mix(x0, noise, sigma))
    assert not torch.equal(got, mix(x0, noise, sigma.to(BF16).float()))  # (the test tells them apart)
    # float32 latents: the mix as it was
    x32, n32 = x0.float(), noise.float()
    assert torch.equal(add_noise(x32, n32, sigma), (1 - sigma) * x32 + sigma * n32)


def velocity_returning(v):
    """A network's velocity that is `v` whatever it is given, and the [(x, sigma)] it was given."""
    seen = []

    def velocity(x, sigma):
        seen.append((x, sigma))
        return v

    return velocity, seen


def test_a_bf16_students_steps_see_latents_mixed_at_the_float32_sigmas():
    sigmas = student_sigmas(4, 5.0)
    start = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(1)).to(BF16)
    v = torch.randn(start.shape, generator=torch.Generator().manual_seed(2)).to(BF16)
    velocity, seen = velocity_returning(v)
    sample_few_step(velocity, start, sigmas, torch.Generator().manual_seed(3))
    assert all(sigma.dtype == torch.float32 for _, sigma in seen)  # (the network's time: its own)
    generator, x = torch.Generator().manual_seed(3), start
    for i, (seen_x, _) in enumerate(seen):
        assert seen_x.dtype == BF16 and torch.equal(seen_x, x), i
        x0 = (x.float() - sigmas[i] * v.float()).to(BF16)
        if i + 1 < len(sigmas):
            x = mix(x0, fresh_noise(x, generator), sigmas[i + 1])


def test_a_bf16_teachers_euler_steps_are_taken_at_the_float32_step_size():
    """sample_euler's x + (sigma_next - sigma) v rounded the step size to the latents' dtype first (a
    bf16 teacher's steps ~2^-9 off the schedule's) and rounded the product and the sum again: each
    step is computed in float32 and rounded to the latents' dtype once."""
    from streamgen.sampling import euler_sigmas, sample_euler

    sigmas = euler_sigmas(8, 5.0)
    start = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(4)).to(BF16)
    v = torch.randn(start.shape, generator=torch.Generator().manual_seed(5)).to(BF16)
    velocity, seen = velocity_returning(v)
    got = sample_euler(velocity, start, sigmas)
    x = rounded_step = start
    for i, (seen_x, sigma) in enumerate(seen):
        assert seen_x.dtype == BF16 and torch.equal(seen_x, x), i
        assert sigma.dtype == torch.float32 and torch.equal(sigma, sigmas[i].expand(1))
        x = (x.float() + (sigmas[i + 1] - sigmas[i]) * v.float()).to(BF16)
        rounded_step = rounded_step + (sigmas[i + 1] - sigmas[i]).to(BF16) * v
    assert len(seen) == 8 and got.dtype == BF16 and torch.equal(got, x)
    assert not torch.equal(got, rounded_step)  # (the test tells them apart)
    # float32 latents: the steps as they were
    x32, v32 = start.float(), v.float()
    want = x32
    for i in range(len(sigmas) - 1):
        want = want + (sigmas[i + 1] - sigmas[i]) * v32
    assert torch.equal(sample_euler(lambda x, sigma: v32, x32, sigmas), want)
