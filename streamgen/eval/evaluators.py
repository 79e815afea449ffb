"""The evaluator networks: a SyncNet-style audio-visual model and an identity encoder.

Both look at frames resized to 64x64 (any input resolution works), so one checkpoint
serves every output size.

SyncNet: a video tower embeds 5 consecutive mouth crops (0.2 s, the lower middle of
the frame, where the renderer's mouth always is) and an audio tower embeds the
log-mel spectrogram of the same 0.2 s (20 mel frames of 10 ms); embeddings are
L2-normalised and trained contrastively (the aligned audio against audio of other
clips and of the same clip shifted by 3..15 frames). The distance between a video
window and an audio window is the Euclidean distance of the unit embeddings (0..2).

Identity encoder: a small CNN over the whole frame whose unit embedding is trained so
frames of one person (any pose, mouth or expression) and that person's reference
image are close, other people far (InfoNCE). CSIM is the cosine similarity of
embeddings; its pooled 96-d features are also the Frechet (FID/FVD) feature space.

Checkpoints are safetensors files with their config in the metadata; a missing or
unreadable one is an `EvaluatorError` that names the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FRAME_SIZE = 64
MOUTH_BOX = (0.46, 0.78, 0.26, 0.74)  # rows, cols as fractions of the frame
MOUTH_SIZE = (24, 32)
WINDOW = 5  # frames per sync window (0.2 s at 25 fps)
MELS = 40
HOP = 160  # 10 ms at 16 kHz: 4 mel frames per video frame
MEL_PER_FRAME = 4
MAX_OFFSET = 15
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "assets" / "evaluators"


class EvaluatorError(ValueError):
    """A missing or unusable evaluator checkpoint."""


# ---------------------------------------------------------------- preprocessing


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, 64, 64] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-2:] != (FRAME_SIZE, FRAME_SIZE):
        x = F.interpolate(
            x, size=(FRAME_SIZE, FRAME_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return x


def mouth_crops(x: torch.Tensor) -> torch.Tensor:
    """[T, 3, 64, 64] -> [T, 3, 24, 32] mouth region."""
    r0, r1, c0, c1 = (round(f * FRAME_SIZE) for f in MOUTH_BOX)
    return F.interpolate(x[:, :, r0:r1, c0:c1], size=MOUTH_SIZE, mode="bilinear", align_corners=False)


_mel_cache: dict[str, torch.Tensor] = {}


def _mel_filters() -> torch.Tensor:
    if "fb" not in _mel_cache:
        n_fft, rate = 512, 16000
        hz_to_mel = lambda f: 2595 * np.log10(1 + f / 700)
        mel_to_hz = lambda m: 700 * (10 ** (m / 2595) - 1)
        edges = mel_to_hz(np.linspace(hz_to_mel(60), hz_to_mel(7600), MELS + 2))
        bins = np.fft.rfftfreq(n_fft, 1 / rate)
        fb = np.zeros((MELS, len(bins)), np.float32)
        for m in range(MELS):
            lo, mid, hi = edges[m : m + 3]
            fb[m] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
        _mel_cache["fb"] = torch.from_numpy(fb)
    return _mel_cache["fb"]


def log_mel(audio: np.ndarray, n_frames: int) -> torch.Tensor:
    """16 kHz audio -> [MELS, n_frames * 4] log-mel, mel frame m centred at sample m*160 + 96 (the
    400-sample window sits 56 samples into stft's 512: 16 samples, 1 ms, after the hop's middle)."""
    need = n_frames * MEL_PER_FRAME * HOP
    a = np.zeros(need, np.float32)
    a[: min(len(audio), need)] = audio[:need]
    x = F.pad(torch.from_numpy(a)[None], (160, 192))  # (see the docstring for where each window lies)
    spec = torch.stft(x, 512, HOP, 400, torch.hann_window(400), center=False, return_complex=True).abs() ** 2
    mel = torch.log(_mel_filters() @ spec[0, :, : n_frames * MEL_PER_FRAME] + 1e-6)
    return mel


def mel_windows(mel: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Audio windows of WINDOW frames starting at video frames `starts` (may reach outside: silence)."""
    pad = (MAX_OFFSET + WINDOW) * MEL_PER_FRAME
    silent = float(np.log(1e-6))
    padded = F.pad(mel, (pad, pad), value=silent)
    idx = (starts[:, None] * MEL_PER_FRAME + pad) + torch.arange(WINDOW * MEL_PER_FRAME)[None]
    return padded[:, idx].permute(1, 0, 2)[:, None]  # [N, 1, MELS, 20]


def video_windows(mouths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """[T, 3, h, w] mouth crops -> [N, 15, h, w] stacks of WINDOW frames from `starts`."""
    idx = starts[:, None] + torch.arange(WINDOW)[None]
    return mouths[idx].flatten(1, 2)


# ---------------------------------------------------------------- networks


def _block(cin: int, cout: int) -> nn.Sequential:
    # strided convolutions instead of pooling: a quarter of the work, which matters on a CPU
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class SyncNet(nn.Module):
    def __init__(self, dim: int = 64, width: int = 16):
        super().__init__()
        self.config = {"dim": dim, "width": width}
        w = width
        self.video = nn.Sequential(
            _block(3 * WINDOW, w),
            _block(w, 2 * w),
            _block(2 * w, 4 * w),
            nn.Flatten(),
            nn.Linear(4 * w * 12, dim),
        )
        self.audio = nn.Sequential(
            _block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w), nn.Flatten(), nn.Linear(4 * w * 5 * 3, dim)
        )

    def embed_video(self, windows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.video(windows), dim=-1)

    def embed_audio(self, windows: torch.Tensor) -> torch.Tensor:
        # per-window normalisation: loudness and voice pitch matter less than timing
        x = (windows - windows.mean(dim=(2, 3), keepdim=True)) / 4.0
        return F.normalize(self.audio(x), dim=-1)


class IdentityEncoder(nn.Module):
    def __init__(self, dim: int = 64, width: int = 16):
        super().__init__()
        self.config = {"dim": dim, "width": width}
        w = width
        # a strided stem keeps the CPU cost small: 64x64 -> 32x32 before the first block
        stem = nn.Sequential(nn.Conv2d(3, w, 4, stride=2, padding=1), nn.ReLU())
        self.body = nn.Sequential(stem, _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w))
        self.head = nn.Linear(8 * w, dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (the Frechet feature space), [N, 8 * width]."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=-1)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(model: nn.Module, path: Path, kind: str, extra: dict | None = None) -> None:
    from streamgen.model.files import save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"kind": kind, "config": json.dumps(model.config), "extra": json.dumps(extra or {})}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(state, path, metadata=meta)


def load_checkpoint(path: Path, kind: str) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.exists():
        if (path.parent / "checkpoints").is_dir():  # (a train-evaluators run stopped before its end)
            raise EvaluatorError(
                f"missing evaluator checkpoint {path}: the train-evaluators run in {path.parent} did "
                "not finish (its checkpoints are there); run it again to go on from them"
            )
        raise EvaluatorError(
            f"missing evaluator checkpoint {path}; train it with `streamgen eval train-evaluators`"
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise EvaluatorError(f"unreadable evaluator checkpoint {path}: {e}") from None
    if meta.get("kind") != kind:
        raise EvaluatorError(f"{path} is not a {kind} checkpoint (kind {meta.get('kind')!r})")
    cls = {"syncnet": SyncNet, "identity": IdentityEncoder}[kind]
    if "config" not in meta:
        raise EvaluatorError(
            f"{path} has no config in its metadata; train it with `streamgen eval train-evaluators`"
        )
    try:
        model = cls(**json.loads(meta["config"]))
    except (ValueError, TypeError, RuntimeError) as e:  # (not JSON, not an object, other settings)
        raise EvaluatorError(f"{path}: its config is not a {kind} network's ({e})") from None
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        # torch names every tensor that does not fit on a line of its own: the first, and a count
        problems = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise EvaluatorError(
            f"evaluator checkpoint {path} does not fit its config: {problems[0]}{more}"
        ) from None
    return model.eval()


class Evaluators:
    """The pair of trained evaluators, loaded from a folder (default: the bundled ones)."""

    def __init__(self, folder: Path | None = None):
        folder = Path(folder) if folder else DEFAULT_DIR
        if folder.is_file():  # (a checkpoint given for its folder: "missing file/syncnet.safetensors")
            raise EvaluatorError(
                f"{folder} is a file, not the folder of the evaluator checkpoints "
                "(syncnet.safetensors and identity.safetensors)"
            )
        self.folder = folder
        self.sync = load_checkpoint(folder / "syncnet.safetensors", "syncnet")
        self.identity = load_checkpoint(folder / "identity.safetensors", "identity")

    @torch.no_grad()
    def sync_embeddings(self, frames: np.ndarray, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Video embeddings [T-4, D] and audio embeddings for offsets: [2*MAX_OFFSET+1, T-4, D]."""
        x = frames_to_tensor(frames)
        mouths = mouth_crops(x)
        n = len(frames) - WINDOW + 1
        starts = torch.arange(n)
        v = self.sync.embed_video(video_windows(mouths, starts))
        mel = log_mel(audio, len(frames))
        offsets = torch.arange(-MAX_OFFSET, MAX_OFFSET + 1)
        all_starts = (starts[None] + offsets[:, None]).flatten()
        a = self.sync.embed_audio(mel_windows(mel, all_starts)).view(len(offsets), n, -1)
        return v, a

    @torch.no_grad()
    def identity_embeddings(self, frames: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit embeddings [T, D], pooled features [T, F]) of frames."""
        embs, feats = [], []
        for k in range(0, len(frames), batch):
            x = frames_to_tensor(frames[k : k + batch])
            f = self.identity.features(x)
            feats.append(f)
            embs.append(F.normalize(self.identity.head(f), dim=-1))
        return torch.cat(embs), torch.cat(feats)
