"""Writing a model directory that `streamgen.models.load_model` reads: `save_model` for a loaded
model, `write_model_dir` for DiT weights written by a function (a distill stage's export, ship's
float16 copy). Each puts the directory in place whole, so that a reader meanwhile (a server, a
stage) finds the old export or the new one, never half of each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from streamgen.files import fixed_temp_names
from streamgen.folders import move_over, new_folder_beside, remove_whole, write_folder_atomically
from streamgen.model.vae import VideoAutoencoder
from streamgen.models import AvatarModel


def _replace_autoencoder(vae: VideoAutoencoder, d: Path) -> None:
    """`vae`'s files in `d`, and no other autoencoder's (a re-export over a directory that held a
    tiny decoder or a Wan VAE left them there, and `load_autoencoder` took them over the new one),
    swapped so that a reader loading `d` meanwhile (a server, a stage) finds the old autoencoder or
    the new one, never none, half of one, or one's config beside the other's weights:

    - each new file is renamed over its old counterpart, one atomic step each, and a new folder
      with no counterpart is renamed in whole (one over an old folder is exchanged with it in one
      step; where the file system cannot, file by file, its weights before the config.json that
      says how to read them). vae.safetensors carries its config, which the loader takes over
      vae_config.json's;
    - only then go the old files that have no counterpart. The loader's choice of kind is wan_vae/,
      else vae_config.json: a new TinyCausalVAE's files lie in place while an old wan_vae/ still
      decides, which then goes in one rename (into a folder deleted after); a new wan_vae/ decides
      before the old TinyCausalVAE's files go;
    - tiny_decoder.safetensors alone decides a tiny decoder: an old one the new autoencoder lacks
      goes first, a new one comes last, so that a decoder is never over a base it was not saved
      with (where both change, a reader meanwhile finds a base decoding with its own decoder).
    """
    from streamgen.model.tiny_decoder import TINY_DECODER_FILE
    from streamgen.model.wan_vae import WanVAE

    # a folder of this export's own: a second export into `d` emptied a shared one under this one
    staging = new_folder_beside(d / "autoencoder")
    try:
        vae.save(staging / "new")
        order = {"vae.safetensors": 0, WanVAE.DIRECTORY: 0, TINY_DECODER_FILE: 2}  # (others: 1)
        new = sorted((p.name for p in (staging / "new").iterdir()), key=lambda name: order.get(name, 1))
        if TINY_DECODER_FILE not in new:
            remove_whole(d / TINY_DECODER_FILE, staging / "old")
        for name in new:
            move_over(staging / "new" / name, d / name, staging / "old")
        for name in ("vae_config.json", "vae.safetensors", WanVAE.DIRECTORY):
            if name not in new:
                remove_whole(d / name, staging / "old")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_model(model: AvatarModel, directory, extra_meta: dict | None = None) -> None:
    """Write a model directory `load_model` reads, put in place whole (`write_model_dir`)."""
    state = {k: v.contiguous() for k, v in model.dit.state_dict().items()}
    meta = {
        "name": model.name,
        "config": model.cfg.to_dict(),
        "height": model.height,
        "width": model.width,
        "shift": model.shift,
        "steps": model.steps,
        **(extra_meta or {}),
    }

    def write_dit(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(state, str(tmp))

    write_model_dir(directory, write_dit, model.vae, meta)


def write_model_dir(directory, write_dit, vae: VideoAutoencoder, meta: dict) -> None:
    """A model directory of the DiT weights `write_dit(tmp)` writes to the file `tmp`, `vae` and
    model.json of `meta`, which readers (a server, a stage) find whole: the old export or the new
    one, never one's model.json beside the other's DiT weights or autoencoder, nor a base
    autoencoder without the tiny decoder it was saved with. Written into a folder beside, then put
    in the directory's place in one step (`streamgen.folders.write_folder_atomically`; what else the
    directory held is linked in first), and read by `load_model` through `read_folder`.

    Where the system cannot exchange folders (not Linux, overlayfs' lower layers), the staged files
    are moved into the directory one by one, model.json last; at a mount point, written into it
    (the DiT weights, the autoencoder: `_replace_autoencoder`, model.json last). Either way under
    the directory's export stamp (`streamgen.folders.EXPORT_STAMP`): a reader meanwhile reads again
    once the export is done, or is told that it is under way or was cut short, rather than pairing
    the new DiT weights with the old model.json."""
    from streamgen.model.files import write_atomically, write_text_atomically
    from streamgen.model.tiny_decoder import TINY_DECODER_FILE
    from streamgen.model.wan_vae import WanVAE

    def write(d: Path) -> None:
        write_atomically(d / "dit.safetensors", write_dit)
        _replace_autoencoder(vae, d)
        write_text_atomically(d / "model.json", json.dumps(meta, indent=2))

    ours = {"model.json", "dit.safetensors", "vae_config.json", "vae.safetensors", WanVAE.DIRECTORY}
    ours.add(TINY_DECODER_FILE)

    # nor the fixed temp names their writers had before (model.json.tmp: carried into every export)
    not_carried = ours | {tmp.name for name in ours for tmp in fixed_temp_names(name)}

    def carry(name: str) -> bool:  # (not the export's files, nor a writer's temp file)
        return name not in not_carried and not (name.startswith(".") and name.endswith(".tmp"))

    write_folder_atomically(directory, write, carry=carry, in_place=write)
