"""The tiled VAE fallback: tiles and their blend weights must reassemble exactly what a whole decode gives
for a decoder that sees only local pixels, and a real VAE must go through it above the size threshold."""

import torch

from difusi import vae as vae_module
from difusi.vae import decode_latents


class _LocalDecoder(torch.nn.Module):
    """A decoder whose every output pixel depends on one latent pixel (2x nearest upsampling of a 1x1 conv),
    so a correct tiling + blending must give exactly the whole-image decode."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Conv2d(4, 3, 1)
        torch.nn.init.normal_(self.mix.weight, generator=torch.Generator().manual_seed(0))

    def decode(self, latents):
        class Out:
            sample = torch.nn.functional.interpolate(self.mix(latents), scale_factor=2, mode="nearest")

        return Out()


def test_tiled_decode_reassembles_a_local_decoder_exactly():
    decoder = _LocalDecoder()
    latents = torch.randn(2, 4, 150, 97, generator=torch.Generator().manual_seed(1))  # several ragged tiles
    with torch.inference_mode():
        whole = decode_latents(decoder, latents, 0.5, tiled=False)
        tiled = decode_latents(decoder, latents, 0.5, tiled=True)
    assert tiled.shape == whole.shape == (2, 3, 300, 194)
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_large_latents_take_the_tiled_path(monkeypatch):
    decoder = _LocalDecoder()
    calls = []
    original = vae_module._decode_tiled
    monkeypatch.setattr(vae_module, "_decode_tiled", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.inference_mode():
        decode_latents(decoder, torch.zeros(1, 4, 64, 64), 1.0)     # 4096 latent pixels: whole decode
        assert calls == []
        decode_latents(decoder, torch.zeros(1, 4, 130, 130), 1.0)   # above TILED_ABOVE: tiles
    assert calls == [1]
