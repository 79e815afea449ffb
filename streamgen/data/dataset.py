"""A torch Dataset over the avatar-world shards (see shards.py for the format), with a latent cache.

ds = AvatarWorldDataset("data/world", "train")
ds.cache_latents(vae_encode, "tiny-vae")       # once: encode every clip, store next to shards
ds = AvatarWorldDataset("data/world", "train", latents="tiny-vae")   # or ds.with_latents("tiny-vae")
item = ds[0]   # video, audio, reference, caption, motion, meta, latents
"""

from __future__ import annotations

import copy
import operator
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch.utils.data

from .manifest import load_manifest
from .shards import NPZ_ERRORS, DataError, ShardReader, check_shard, save_npz


def _latent_path(root: Path, name: str, shard_file: str) -> Path:
    return Path(root) / "latents" / name / shard_file


# the shard files a dataset keeps open in one process, the most recently read: every shard read
# stayed open, and a split of more shards than the open-file limit (ulimit -n: often 1024) failed
# part way through an epoch ("corrupted shard ...: Too many open files")
MAX_OPEN_SHARDS = 32


def _kept_open(readers: dict[int, ShardReader], s: int, open_reader: Callable[[], ShardReader]):
    """The reader of shard `s` in `readers` (opened by `open_reader` where it is not), the least
    recently read of them closed past MAX_OPEN_SHARDS. `readers` is in the order they were read."""
    reader = readers.pop(s, None)
    if reader is None:
        reader = open_reader()
        while len(readers) >= MAX_OPEN_SHARDS:
            readers.pop(next(iter(readers))).close()
    readers[s] = reader  # (last: the most recently read)
    return reader


class AvatarWorldDataset(torch.utils.data.Dataset):
    """A torch-compatible Dataset of avatar-world clips (map-style: __len__ and __getitem__).

    Items are dicts: video uint8 [T, H, W, 3], audio float32 [N], reference uint8 [H, W, 3],
    caption str, motion float32 [T, K] (columns `motion_names`), meta dict, and `latents`
    (whatever the encoder returned, as a numpy array) when built with `latents=NAME` after
    `cache_latents(encode_fn, NAME)`. Returned arrays are numpy; torch's default collate
    turns them into tensors; use `collate_clips` for batches with captions and metadata.
    Shard readers are opened lazily per process, so the dataset works with DataLoader workers.
    """

    def __init__(self, root: str | Path, split: str = "train", latents: str | None = None):
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        if split not in self.manifest["splits"]:
            raise DataError(f"unknown split {split!r}; the dataset has {', '.join(self.manifest['splits'])}")
        self.split = split
        self.motion_names = self.manifest["motion_names"]
        self.shards = self.manifest["splits"][split]["shards"]
        # where each shard's clips begin in the split: a (shard, clip) pair per clip was a list as long
        # as the dataset (3.2M clips: 250 MB), in every DataLoader worker (copied as it was read)
        self._starts = np.cumsum([0] + [shard["clips"] for shard in self.shards])
        self.latents = latents
        self._check_latents()
        # every shard's sha256 checked here, once, in the process that makes the dataset: DataLoader
        # workers that are not persistent are made anew every epoch, with no shard open, and each
        # hashed every shard it opened, every epoch (12% of an epoch's time with 2 workers at 64x64,
        # 32% with 8). A reader skips the hash of a file that is still the one checked here.
        self._checked = [
            check_shard(self.root / shard["file"], shard.get("bytes"), shard.get("sha256"))
            for shard in self.shards
        ]
        self._readers: dict[int, ShardReader] = {}
        self._latent_readers: dict[int, ShardReader] = {}
        self._pid = os.getpid()

    def _check_latents(self) -> None:
        """DataError unless the latent cache `self.latents` (if any) holds every shard of the split,
        encoded from the shard the manifest records."""
        if self.latents is None:
            return
        for shard in self.shards:
            path = _latent_path(self.root, self.latents, shard["file"])
            if not path.exists():
                raise DataError(
                    f"latent cache {self.latents!r} is missing {shard['file']}; run cache_latents"
                )
            # (a stale file's latents were read as this clip's, without a word)
            _check_not_stale(path, shard, self.root / "latents" / self.latents)

    def with_latents(self, name: str) -> AvatarWorldDataset:
        """This split read with the latent cache `name` (`cache_latents`), as
        `AvatarWorldDataset(root, split, latents=name)` reads it, without hashing every shard again:
        the shards checked here are taken as checked (a file changed since is hashed again when read)."""
        ds = copy.copy(self)
        ds.latents, ds._readers, ds._latent_readers, ds._pid = name, {}, {}, os.getpid()
        ds._check_latents()
        return ds

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, k: int) -> tuple[int, int]:
        """The shard of item `k` (negative: from the end, as a list's) and its clip there."""
        n = len(self)
        k = operator.index(k)
        if not -n <= k < n:
            raise IndexError(f"item {k} of a split of {n} clips")
        k %= n
        s = int(np.searchsorted(self._starts, k, side="right")) - 1
        return s, k - int(self._starts[s])

    def _own_readers(self) -> None:
        """Readers opened in this process only: forked DataLoader workers inherited the parent's
        open files, one file position shared by all, and read each other's bytes as corrupt."""
        if self._pid != os.getpid():
            self._readers, self._latent_readers, self._pid = {}, {}, os.getpid()

    def __getstate__(self) -> dict:  # (spawned workers: a pickled dataset opens its own)
        return {**self.__dict__, "_readers": {}, "_latent_readers": {}}

    def _reader(self, s: int) -> ShardReader:
        self._own_readers()
        shard = self.shards[s]
        return _kept_open(
            self._readers,
            s,
            lambda: ShardReader(
                self.root / shard["file"], shard.get("bytes"), shard.get("sha256"), self._checked[s]
            ),
        )

    def __getitem__(self, k: int) -> dict:
        s, i = self._locate(k)
        item = self._reader(s).clip(i)
        if self.latents is not None:
            self._own_readers()
            path = _latent_path(self.root, self.latents, self.shards[s]["file"])
            latents = _kept_open(self._latent_readers, s, lambda: ShardReader(path))
            item["latents"] = latents._get(f"{i:04d}.latents")
        return item

    def cache_latents(self, encode_fn: Callable, name: str, overwrite: bool = False) -> Path:
        """Apply `encode_fn(video uint8 [T,H,W,3]) -> array-like` once per clip and store the results.

        The cache sits next to the shards in latents/NAME/<split>/, one file per shard,
        written atomically; shards already cached are skipped unless `overwrite`.
        Returns the cache folder. Reopen with `AvatarWorldDataset(root, split, latents=NAME)`.
        """
        for s, shard in enumerate(self.shards):
            path = _latent_path(self.root, name, shard["file"])
            if path.exists() and not overwrite:
                _check_not_stale(path, shard, self.root / "latents" / name)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            reader = self._reader(s)
            arrays = {"shard_sha256": np.array(shard.get("sha256", ""))}  # what they were encoded from
            for i in range(shard["clips"]):
                latent = encode_fn(reader._get(f"{i:04d}.video"))
                if hasattr(latent, "detach"):
                    latent = latent.detach().cpu().numpy()
                arrays[f"{i:04d}.latents"] = np.asarray(latent)
            save_npz(path, arrays)
        return self.root / "latents" / name


def _check_not_stale(path: Path, shard: dict, cache: Path) -> None:
    """DataError if the latent file at `path` (in the cache folder `cache`) was encoded from
    another version of `shard`."""
    encoded_from = _encoded_from(path)
    if encoded_from is not None and shard.get("sha256") not in (None, encoded_from):
        raise DataError(
            f"{path} holds the latents of an earlier {shard['file']} (the dataset was made again): "
            f"delete {cache} to encode this one"
        )


def _encoded_from(path: Path) -> str | None:
    """The sha256 of the shard a latent file was encoded from (None: not recorded)."""
    try:
        with np.load(path) as cached:
            return str(cached["shard_sha256"]) or None if "shard_sha256" in cached.files else None
    except NPZ_ERRORS as e:  # (a file cut short: a copy that stopped)
        if isinstance(e, OSError) and e.errno is not None:  # (the system's refusal, not the bytes: as ShardReader)
            raise DataError(f"cannot read latent cache file {path}: {e.strerror or e}") from None
        raise DataError(f"corrupted latent cache file {path}: {e}: delete it to encode it again") from None


def collate_clips(items: list[dict]) -> dict:
    """DataLoader collate_fn: stacks arrays into tensors, keeps captions and metadata as lists."""
    import torch

    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], np.ndarray):
            batch[key] = torch.from_numpy(np.stack(values))
        else:
            batch[key] = values
    return batch
