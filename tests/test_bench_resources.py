"""`streamgen bench resources`' refusals (what it finds: tests/test_kernels_offline.py)."""

import pytest


def test_an_unknown_case_is_refused_before_the_wan_size_cases_are_built(monkeypatch):
    # `--only layernorm` built every case's Wan2.1-1.3B-size tensors (28 s here) before saying so
    pytest.importorskip("triton")
    from bench import kernels, resources
    from streamgen.cli import UserError

    built, shapes = [], kernels.kernel_shapes

    def recorded(quick):
        built.append(quick)
        return shapes(quick=quick)

    monkeypatch.setattr(kernels, "kernel_shapes", recorded)
    with pytest.raises(UserError, match=r"^--only: unknown case\(s\) layernorm; the cases are layernorm_modulate, "):
        resources.run(only=("layernorm",))
    assert built and False not in built  # the small shapes' names only


def test_the_interpreter_set_in_the_environment_is_one_line(monkeypatch):
    pytest.importorskip("triton")
    from bench import resources
    from streamgen.cli import UserError
    from streamgen.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "INTERPRET", True)  # as TRITON_INTERPRET=1 sets it at import
    with pytest.raises(UserError, match="TRITON_INTERPRET=1 is set"):
        resources.run(only=("gelu_tanh",))
