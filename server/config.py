"""Server settings: one dataclass, filled from the command line or by tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


@dataclass
class ServerConfig:
    model: str = "tiny-avatar"
    height: int | None = None  # None: the model's native resolution
    width: int | None = None
    steps: int | None = None
    decode_dtype: str = (
        "auto"  # the autoencoder's decoder: auto (bfloat16 on CPUs with AMX or AVX512-BF16), float32, bfloat16
    )
    device: str = "cpu"
    inference_process: bool = False  # the model in a child process (serve --model-process)
    # a model process that answers no operation for this long once the server is ready is stuck:
    # it is killed and the server reports itself down (serve --model-timeout; 0: no limit)
    model_timeout_s: float = 60.0
    sp: int = 1  # > 1: this is rank 0 of `serve --sp N` under torchrun (server/sp_host.py)
    torch_threads: int | None = None  # None: torch's default; 1 is far faster on an oversubscribed CPU
    lanes: int = 1  # threads that generate, each for its own sessions (server/scheduler.py; in process only)
    max_sessions: int = 8  # upper bound; measured capacity may admit fewer
    measure_capacity: bool = True  # False: admit exactly max_sessions (tests on a busy machine)
    token: str | None = None  # when set, creating a session needs "Authorization: Bearer <token>"
    loopback: bool = False  # make aioice offer 127.0.0.1 (tests, benchmarks, same-machine use)
    ice_servers: list[dict] = field(default_factory=list)  # STUN/TURN, RTCIceServer dicts (server/ice.py)
    cors_origins: list[str] = field(default_factory=list)  # other origins whose pages may call the API ("*": any)
    idle_timeout_s: float = 60.0  # a session with no transport / no input for this long is closed
    # a session no client connected to (no WebSocket, no WHEP offer) this long after its creation
    # is closed ("unclaimed"), sooner than idle: a page left while its session was being created
    # held a place on a full server for the whole idle limit
    unclaimed_timeout_s: float = 20.0
    max_duration_s: float = 3600.0
    # a WebRTC peer that sent packets and then nothing for this long is gone (a killed tab): its
    # session is closed (server/webrtc.py, watch_peer); 0: only ICE consent ends it (~30 s)
    peer_timeout_s: float = 10.0
    max_upload_bytes: int = 4 * 1024 * 1024
    # a request body not all received within this long, plus 1 s per 64 KiB it declares (a slow
    # uplink's upload: web/api.js waits as long), is answered 408: a client that sent its headers and
    # then a body a byte at a time, or part of one and nothing more, held its socket and buffer for good
    body_timeout_s: float = 30.0
    # a request head (the request line and headers) not all received within this long of its first
    # byte, or a connection that sends none for this long, is answered 408 and closed (server/connections.py):
    # uvicorn waited for a head without limit, and a few hundred clients sending one a byte at a
    # time used up the process's file descriptors
    header_timeout_s: float = 20.0
    # while this many connections are open (WebSockets too), a request on another is answered 503
    # (server/connections.py; serve --max-connections); 0: no bound
    max_connections: int = 256
    max_image_pixels: int = 4096 * 4096  # refuse larger references before decoding them
    max_audio_ahead_s: float = 30.0  # audio queued beyond the video position (speech, fast clients)
    playout_delay_s: float | None = None  # None: from the measured chunk time
    # sessions join their lane's chunk schedule, and the worker waits for chunks due soon, so that
    # chunks are generated together (server/batching.py); False: each when it falls due
    align_batches: bool = True
    # chunks the model makes before the server is ready; None: up to the first chunk that attends
    # to a full ring (StreamSession.chunks_to_full_ring: 8 for Wan's 21-frame ring in 3-frame
    # chunks), so that no served stream meets a new attention length first, and two more, whose
    # times measure the capacity
    warmup_chunks: int | None = None
    warm_text_encoder: bool = True  # load the caption encoder at startup instead of on first use
    stamp_frames: bool = False  # benchmark: write the input cut-off time into each picture
    ws_send_timeout_s: float = 5.0  # a WebSocket client that does not read for this long is dropped
    web_dir: Path = field(default_factory=lambda: WEB_DIR)

    @property
    def host_in_process(self) -> bool:
        """The model runs in this process (not a model process, not sequence-parallel ranks)."""
        return not self.inference_process and self.sp == 1
