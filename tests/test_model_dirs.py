"""Model directories with the Wan VAE (and TAEHV's tiny decoder) behind the DiT: what a
distillation that trains with `model.vae: wan:DIR` exports, and every command loads
(`streamgen.models.load_model`). They stream the frames of the model they were saved from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from distill.build import export_model  # noqa: E402
from streamgen.model import DiT, get_config  # noqa: E402
from streamgen.model.tiny_decoder import TinyDecoder, TinyDecoderConfig, TinyDecoderVAE  # noqa: E402
from streamgen.model.vae import WanVAE  # noqa: E402
from streamgen.models import AvatarModel, load_autoencoder, load_model  # noqa: E402
from streamgen.stream import StreamSession  # noqa: E402

HEIGHT, WIDTH = 32, 48


def wan_based_model(tiny_decoder: bool = False) -> AvatarModel:
    """A debug DiT over a small random Wan VAE (latent statistics that are not 0 and 1, so that a
    lost config would show), optionally decoding through a tiny decoder whose config the weights'
    shapes do not tell (its last stage does not upsample; a pixel shuffle does)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    dit = DiT(get_config("debug", frames_per_chunk=3, window_frames=6, in_channels=4)).eval()
    wan = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0],
    )  # fmt: skip
    vae = WanVAE(wan.eval())
    if tiny_decoder:
        cfg = TinyDecoderConfig(
            latent_channels=4, widths=(16, 12, 8, 8), blocks_per_stage=1,
            space_upscale=(True, True, False), patch_size=2,
        )  # fmt: skip
        vae = TinyDecoderVAE(vae, TinyDecoder(cfg).eval())
    return AvatarModel("wan-debug", dit, vae, HEIGHT, WIDTH, shift=5.0, steps=2)


@torch.no_grad()
def stream(model: AvatarModel, chunks: int = 2) -> np.ndarray:
    session = StreamSession(model, steps=2, dtype=torch.float32)
    rng = np.random.default_rng(0)
    session.start((rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8), seed=0)
    session.push_audio((rng.standard_normal(16000 * 4) * 0.1).astype(np.float32))
    return np.concatenate([session.next_chunk()[0] for _ in range(chunks)])


def export(model: AvatarModel, directory, compact: bool = False):
    return export_model(
        model.dit, model.vae, directory, model.name, model.height, model.width, model.shift, model.steps,
        compact=compact,
    )  # fmt: skip


@pytest.mark.parametrize("tiny_decoder", [False, True], ids=["wan_vae", "tiny_decoder"])
def test_a_wan_based_model_directory_streams_the_frames_of_its_model(tmp_path, tiny_decoder):
    model = wan_based_model(tiny_decoder)
    expected = stream(model)
    loaded = load_model(str(export(model, tmp_path / "model")))
    assert type(loaded.vae) is type(model.vae)
    if tiny_decoder:
        assert isinstance(loaded.vae.vae, WanVAE) and loaded.vae.decoder.cfg == model.vae.decoder.cfg
    wan = loaded.vae.vae if tiny_decoder else loaded.vae
    assert torch.equal(wan.latent_std, (model.vae.vae if tiny_decoder else model.vae).latent_std)
    got = stream(loaded)
    assert got.shape == expected.shape and got.shape[1:] == (HEIGHT, WIDTH, 3)
    assert np.array_equal(got, expected)


def test_a_compact_export_loads_in_float32_within_float16s_rounding(tmp_path):
    model = wan_based_model()
    d = export(model, tmp_path / "compact", compact=True)
    vae = load_autoencoder(d)
    assert isinstance(vae, WanVAE) and {p.dtype for p in vae.parameters()} == {torch.float32}
    for (name, got), want in zip(vae.state_dict().items(), model.vae.state_dict().values()):
        torch.testing.assert_close(got, want, atol=2**-24, rtol=2**-11, msg=name)  # fp16: 10 bits


def test_a_directory_without_an_autoencoder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no autoencoder"):
        load_autoencoder(tmp_path)


def test_distillation_takes_the_autoencoder_of_a_wan_based_model_directory(tmp_path):
    from distill.build import load_vae
    from distill.config import ModelConfigSection

    d = export(wan_based_model(tiny_decoder=True), tmp_path / "model")
    vae = load_vae(ModelConfigSection(vae=str(d)), latent_channels=4, temporal=4, seed=0)
    assert isinstance(vae, TinyDecoderVAE) and not any(p.requires_grad for p in vae.parameters())


def test_the_server_streams_a_wan_based_model_directory(tmp_path):
    """`serve --model DIR` loads it as every command does: a session streams its frames."""
    import json

    from fastapi.testclient import TestClient
    from server_helpers import server_config, wait_ready

    from server.app import create_app
    from server.protocol import HEADER, MsgType

    d = str(export(wan_based_model(tiny_decoder=True), tmp_path / "model"))
    with TestClient(create_app(server_config(model=d), model=load_model(d))) as client:
        wait_ready(client)
        r = client.post("/v1/sessions", json={"avatar": "bo", "seed": 1})
        assert r.status_code == 201, r.text
        s = r.json()
        with client.websocket_connect(f"{s['stream']}?token={s['token']}") as ws:
            ws.send_text(json.dumps({"type": "start", "format": "rgb"}))
            ready = json.loads(ws.receive_text())
            assert (ready["width"], ready["height"]) == (WIDTH, HEIGHT), ready
            frames = []
            while len(frames) < 12:  # the first chunk (9 frames: Wan's 1 + 4k) and more
                data = ws.receive().get("bytes")
                if data is not None and data[0] == MsgType.VIDEO_RGB:
                    frames.append(np.frombuffer(data[HEADER.size :], np.uint8).reshape(HEIGHT, WIDTH, 3))
            ws.send_text(json.dumps({"type": "stop"}))
    assert np.stack(frames).std() > 1  # pictures, not a constant
