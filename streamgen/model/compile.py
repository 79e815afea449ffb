"""torch.compile for a DiT's blocks, applied from outside the model.

    compile_blocks(dit)        # each block's forward under inductor
    ...                        # the first calls compile (a server's warm-up)
    compile_blocks(dit, None)  # eager again

What a block computes around its self-attention (adaLN, q/k norms and RoPE,
the cross-attentions, the MLP, the gated residuals) is compiled; the
self-attention's cache step and attention (`SelfAttention.attend`) stay eager.
That keeps the shapes a compiled block sees to the batch and the tokens of
its input (a chunk, or the sink at a stream's start): the attended keys grow
while the ring fills, chunk by chunk, and each length would be a graph of its
own, compiled on a live stream. With the seam excluded a stream compiles about
seven graphs, once, whatever the window.

Shapes start static and a dimension becomes symbolic once a second size of it
comes (dynamo's automatic dynamic shapes). Batched sessions after a single
one compile graphs with the batch symbolic, once, and every batch size runs
them (when a batch comes first, the second batch size compiles them). On
tiny-avatar at 256x256, batches of 4 and 6 sessions after 1 and 2 compiled
no graph, against 7 each with static shapes (~20 s a batch size there), and
their chunks took as long either way; at 128x128 (float32 blocks, where each
call's own costs weigh more) a batch of 4 took ~10% longer (the JSON:
bench/results/cpu-2026-12-02-compile-symbolic-batch.json). With static shapes a server's
warm-up compiled every batch size it could make, and past dynamo's limit of
graphs per code a block ran eagerly.

Where it pays: on this 2-core CPU, tiny-avatar's sessions ran 1.15-1.23x as
fast with compiled blocks at 256x256 and 320x320 (bfloat16 DiT: inductor fuses
the conversions to float32 around its norms and modulations into their loops;
profiled over 4 chunks at 256x256, 4552 dtype conversions became 600, and the
operators' time 520 ms 451), 1.08x at
128x128 and 1.10x at 192x192 (float32). A cold compile takes 10-30 s a stream
(inductor's on-disk cache makes a restart's a few seconds), so it is for
servers, which compile in their warm-up (`streamgen serve --compile`), and is
off by default.

Inductor's CPU kernels keep the thread count of the call that compiled them,
and dynamo's guards check it: a forward compiles its graphs for the threads
`streamgen.cpu_threads` gives it, and a batch large enough to run on more
compiles its own (once, batch symbolic). And they run holding
the GIL (torch 2.13's Python bindings for them call the kernel with it held),
which eager operators release: two lanes of a server (`serve --lanes 2`) then
take turns in every fused loop. `release_gil_in_cpu_kernels` makes the
bindings release it around the call, as an operator does.
"""

from __future__ import annotations

import torch
from torch import nn

# graphs one block's forward may compile (dynamo's default is 8): a stream's shapes (about 7),
# those of a batch's first size and those with the batch symbolic, and a fresh cache's first call
RECOMPILE_LIMIT = 64


def compile_blocks(
    dit: nn.Module, backend: str | None = "inductor", dynamic: bool | None = None
) -> nn.Module:
    """Run each of `dit`'s blocks under torch.compile(backend, dynamic=dynamic), its
    self-attention's `attend` eager; backend None: all eager again. In place; returns dit.

    dynamic None: shapes static until a dimension's size changes (a batch's: above). False: every
    shape static, for one stream (`bench gpu`'s variant: its chunk's frame count, 3 against the
    sink's 1, would otherwise be symbolic in its graphs)."""
    for block in dit.blocks:
        attn = block.self_attn
        if backend is None:
            block._compiled_call_impl = None
            if "_eager_attend" in vars(attn):
                eager = vars(attn).pop("_eager_attend")
                if eager is None:
                    del attn.attend  # the class's own again
                else:
                    attn.attend = eager
            continue
        # the instance's own attend (sequence parallelism's wrapper), or None: the class's. Made
        # afresh each time, so that a deep copy of compiled blocks compiles its own
        eager = vars(attn).get("_eager_attend", vars(attn).get("attend"))
        attn._eager_attend = eager
        attn.attend = torch.compiler.disable(type(attn).attend.__get__(attn) if eager is None else eager)
        block.compile(backend=backend, dynamic=dynamic)
    if backend is not None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        release_gil_in_cpu_kernels()
    dit.compiled_blocks = backend
    return dit


# inductor's Python bindings for a CPU kernel, as torch 2.13 writes them (`kernel(args...)` with
# the GIL held), and ours: the arguments are read from their Python objects with the GIL, then the
# kernel, which touches only raw pointers, runs without it (restored however it returns)
_BINDING_CALL = "kernel({}); Py_RETURN_NONE;"
_BINDING_CALL_WITHOUT_GIL = "call_without_gil(kernel, {}); Py_RETURN_NONE;"
_CALL_WITHOUT_GIL = """
template <typename Kernel, typename... A> static inline void call_without_gil(Kernel kernel, A... args) {{
    struct Released {{
        PyThreadState* state = PyEval_SaveThread();
        ~Released() {{ PyEval_RestoreThread(state); }}
    }} released;
    kernel(args...);
}}
"""


def release_gil_in_cpu_kernels() -> bool:
    """Make the CPU kernels inductor builds from now on release the GIL while they run, so that
    threads running compiled code (the server's lanes) run side by side, as they do eager. Returns
    whether they do; False where the bindings are not those this was written for (left as they are)."""
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache as bindings
    except ImportError:
        return False
    if bindings.call_entry_function == _BINDING_CALL_WITHOUT_GIL:
        return True
    if bindings.call_entry_function != _BINDING_CALL or bindings.extra_parse_arg != "":
        return False
    bindings.extra_parse_arg = _CALL_WITHOUT_GIL
    bindings.call_entry_function = _BINDING_CALL_WITHOUT_GIL
    return True


def compiled_backend(dit: nn.Module) -> str | None:
    """The backend `compile_blocks` put `dit`'s blocks under, or None (eager)."""
    return getattr(dit, "compiled_blocks", None)
