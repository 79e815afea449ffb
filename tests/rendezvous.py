"""A gloo group's rendezvous for ranks a test spawns, at a store this test process holds: no port
chosen and let go (free_port) between processes. Kept apart from server_helpers, whose imports (the
server's app) a spawned rank would pay for at its start."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def a_held_rendezvous_store():
    """For the block, the port of a gloo group's rendezvous store (torch's TCPStore) that this test
    process serves, as torchrun's agent serves its ranks' (at_the_held_store). Not a port chosen
    and let go (free_port) for rank 0 to bind: another test process (-n 2) could take it meanwhile,
    and the group failed to form (EADDRINUSE), or met at another group's store."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        yield store.port
    finally:
        del store  # (its server's socket closes with it)


def at_the_held_store(port: int) -> dict[str, str]:
    """A spawned rank's environment variables for the env:// rendezvous (the one a torchrun worker's
    init_process_group joins) at a_held_rendezvous_store's `port`: torchrun's agent store
    (TORCHELASTIC_USE_AGENT_STORE), which every rank joins as a client."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "True"}
