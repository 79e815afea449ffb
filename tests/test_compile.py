"""`serve --compile`: a DiT's blocks under torch.compile (streamgen/model/compile.py).

The compiled blocks give the eager frames, compile every shape of a stream once
(none after the warm-up), compile afresh in a copy of the DiT, and come back
eager; the server's warm-up compiles the shapes of batched sessions too. Under
compile, RoPE runs in real arithmetic and the kernel dispatch takes the
references; inductor's CPU kernels run without the GIL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from streamgen.model.compile import compile_blocks, compiled_backend
from streamgen.models import load_model
from streamgen.stream import StreamSession
from streamgen.stream_batch import next_chunks, write_pending_chunks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SIZE = 32


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def started(model, seed=0, **session):
    face = (np.random.default_rng(seed).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    stream = StreamSession(model, height=SIZE, width=SIZE, **session)
    stream.start(face, seed=seed)
    t = np.arange(16000 * 4) / 16000
    stream.push_audio((0.3 * np.sin(2 * np.pi * (150 + 40 * seed) * t)).astype(np.float32))
    return stream


def frames(model, chunks, **session) -> np.ndarray:
    stream = started(model, **session)
    return np.stack([stream.next_chunk()[0] for _ in range(chunks)]).astype(int)


def test_rope_in_real_arithmetic_under_compile_rotates_as_the_complex_one():
    from streamgen.kernels import Rope, reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 3, 8, generator=gen)
    angles = torch.rand(12, 4, generator=gen) * 6
    eager = reference.apply_rope(x, Rope.of(angles))
    compiled = torch.compile(reference.apply_rope, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x, Rope.of(angles)), eager, atol=1e-6)
    assert torch.allclose(compiled(x.bfloat16(), angles).float(), eager, atol=0.05)


def test_under_compile_the_kernel_dispatch_takes_the_references(monkeypatch):
    """On a GPU, inductor fuses the references into kernels of its own; our Triton kernels would
    be opaque calls in its graph."""
    from streamgen import kernels

    class NoTriton:
        def __getattr__(self, name):
            raise AssertionError(f"Triton's {name} called")

    monkeypatch.setattr(kernels, "_TRITON_ON_CPU", True)  # as if on CUDA
    monkeypatch.setattr(kernels, "_triton_ops", NoTriton)
    gen = torch.Generator().manual_seed(0)
    x, shift, scale = torch.randn(1, 2, 4, 8, generator=gen), *torch.randn(2, 1, 2, 8, generator=gen)
    with pytest.raises(AssertionError, match="Triton's layernorm_modulate"):
        kernels.layernorm_modulate(x, shift, scale)  # eager: the Triton kernel
    compiled = torch.compile(kernels.layernorm_modulate, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x, shift, scale), kernels.reference.layernorm_modulate(x, shift, scale))


def test_compiled_cpu_kernels_run_without_the_gil(monkeypatch):
    """Inductor's bindings call a CPU kernel holding the GIL; ours release it around the call (the
    server's lanes then run compiled blocks side by side), and the kernel computes the same."""
    from torch._inductor import config
    from torch._inductor.codecache import CppPythonBindingsCodeCache as bindings

    from streamgen.model.compile import release_gil_in_cpu_kernels

    assert release_gil_in_cpu_kernels() and release_gil_in_cpu_kernels()  # idempotent
    sources = []
    load_async = bindings.load_async.__func__

    def recording(cls, source, *args, **kwargs):
        sources.append(source)
        return load_async(cls, source, *args, **kwargs)

    monkeypatch.setattr(bindings, "load_async", classmethod(recording))

    def fn(x):
        return torch.nn.functional.layer_norm(x.float(), (x.shape[-1],)).mul(3).to(x.dtype)

    x = torch.randn(3, 5, 64).bfloat16()
    with config.patch(force_disable_caches=True):  # built here, not taken from the cache
        out = torch.compile(fn, backend="inductor", dynamic=False)(x)
    torch._dynamo.reset()
    assert torch.allclose(out.float(), fn(x).float(), atol=0.02)
    kernels = [src for src in sources if "PyInit_kernel" in src]
    assert kernels and all("call_without_gil(kernel, " in src for src in kernels)


def test_bindings_of_another_torch_are_left_as_they_are(monkeypatch):
    from torch._inductor.codecache import CppPythonBindingsCodeCache as bindings

    from streamgen.model.compile import release_gil_in_cpu_kernels

    monkeypatch.setattr(bindings, "call_entry_function", "return kernel({});")
    monkeypatch.setattr(bindings, "extra_parse_arg", "")
    assert not release_gil_in_cpu_kernels()
    assert bindings.call_entry_function == "return kernel({});" and bindings.extra_parse_arg == ""


def test_compiled_blocks_give_the_eager_frames_and_compile_a_stream_once():
    model = load_model("debug")
    dit = model.dit
    chunks = started(model).chunks_to_full_ring + 2  # every attention length, then the steady one
    eager = frames(model, chunks)
    model.compile_dits()
    assert compiled_backend(dit) == "inductor" and model.compile_backend == "inductor"
    before = graphs()
    compiled = frames(model, chunks)
    warmed = graphs()
    assert warmed > before  # it did compile
    assert np.abs(compiled - eager).max() <= 2
    frames(model, chunks + 3)  # a second stream, longer: nothing new
    assert graphs() == warmed
    model.compile_dits(None)
    assert compiled_backend(dit) is None
    for block in dit.blocks:
        assert block._compiled_call_impl is None and "attend" not in vars(block.self_attn)
    assert np.array_equal(frames(model, chunks), eager)


def test_a_copy_in_another_dtype_compiles_its_own_blocks():
    """The bf16 copy a session may run (`AvatarModel.dit_in`) is made from the compiled DiT: its
    blocks must run its own weights, and its attend wrappers must be its own, not the original's."""
    model = load_model("debug")
    model.compile_dits()
    bf16 = model.dit_in(torch.bfloat16)
    assert compiled_backend(bf16) == "inductor"
    for copied, original in zip(bf16.blocks, model.dit.blocks):
        assert copied.self_attn.attend is not original.self_attn.attend
    with torch.no_grad():  # the copy's own weights, changed: blocks that ran others' would not see it
        for p in bf16.blocks.parameters():
            p.zero_()
    compiled = frames(model, 3, dtype="bfloat16")
    model.compile_dits(None)
    assert compiled_backend(bf16) is None
    eager = frames(model, 3, dtype="bfloat16")
    assert np.abs(compiled - eager).max() <= 4


def test_an_instance_attend_is_kept_and_given_back():
    """Sequence parallelism replaces `attend` on the instance: compiling wraps that one and
    going eager restores it."""
    model = load_model("debug")
    attn = model.dit.blocks[0].self_attn
    calls = []

    def sharded_attend(*args, **kwargs):
        calls.append(1)
        return type(attn).attend(attn, *args, **kwargs)

    attn.attend = sharded_attend
    compile_blocks(model.dit)
    frames(model, 2)
    assert calls  # the instance's attend ran, under the compiled block
    compile_blocks(model.dit, None)
    assert attn.attend is sharded_attend


def batches_compile(model, sizes, chunks=3) -> list[int]:
    """The graphs each batch of `sizes` sessions compiles, batch after batch."""
    compiled = []
    for batch in sizes:
        before = graphs()
        streams = [started(model, seed) for seed in range(batch)]
        for _ in range(chunks):
            next_chunks(streams)
            write_pending_chunks(streams)
        compiled.append(graphs() - before)
        for stream in streams:
            stream.close()
    return compiled


def test_a_batch_compiles_its_graphs_once_for_every_batch_size():
    """After a single session's, the first batch compiles its graphs with the batch symbolic;
    larger and smaller ones run them (static shapes compiled each batch size: a server's
    warm-up compiled every one it could make, and past dynamo's limit a block ran eagerly)."""
    torch._dynamo.reset()  # the tests before compiled a stream's graphs of the same code
    model = load_model("debug")
    model.compile_dits()
    first, *others = batches_compile(model, (1, 3, 2, 5, 4))
    assert first > 0 and others[0] > 0  # a stream's graphs, then a batch's
    assert others[1:] == [0, 0, 0]


def test_the_server_warm_up_compiles_batched_sessions_too(monkeypatch):
    """Batches of 4 sessions and more run their forwards on two threads here: dynamo's guards
    check the thread count, so they compile graphs of their own, which the warm-up compiles too
    (with its largest batch, 5: a batch of 7 compiles nothing either)."""
    from fastapi.testclient import TestClient
    from server_helpers import server_config, wait_ready

    import streamgen.cpu_threads
    from server.app import create_app

    torch._dynamo.reset()
    model = load_model("debug")
    model.compile_dits()
    probe = started(model)
    one = streamgen.cpu_threads.chunk_forward_flop(probe.dit, probe.latent_hw, model.cfg.frames_per_chunk)
    probe.close()
    monkeypatch.setattr(streamgen.cpu_threads, "DIT_PARALLEL_FLOP", 3.5 * one)
    threads = torch.get_num_threads()
    config = server_config(max_sessions=5, height=SIZE, width=SIZE, torch_threads=2)
    try:
        torch.set_num_threads(2)
        with TestClient(create_app(config, model=model)) as c:
            wait_ready(c)  # (a compiled warm-up is long: the wait follows its stages)
            assert batches_compile(model, (2, 3, 4, 7)) == [0, 0, 0, 0]
    finally:
        torch.set_num_threads(threads)


def test_use_compile_reaches_the_models_loaded_afterwards():
    """`serve --compile` chooses through the environment, so a model process inherits it."""
    from streamgen.models import use_compile

    use_compile(None)
    assert load_model("debug").compile_backend is None
    use_compile("inductor")
    model = load_model("debug")
    assert model.compile_backend == "inductor" and compiled_backend(model.dit) == "inductor"
