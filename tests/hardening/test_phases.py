"""Interrupt, skip and NaN in every phase of a job (text encoding, sampling, decoding), with difusi-mini.

The phases are reached with forward hooks on the real modules: the CLIP text model, the UNet and the VAE
decoder. A hook either asks for a stop/skip while its phase runs, or replaces the module's output by NaN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

from difusi.errors import Interrupted, NumericalError
from difusi.models import default_model_path, load_model
from difusi.params import GenerationParams
from difusi.pipeline import txt2img

STEPS = 3
PARAMS = GenerationParams(prompt="a red circle", seed=11, steps=STEPS, sampler_name="Euler", width=64, height=64,
                          batch_size=1, n_iter=2)


@pytest.fixture(scope="module")
def mini():
    """A private difusi-mini (not the process-wide cache), since hooks are attached to its modules."""
    return load_model(default_model_path())


def phase_module(model, phase: str) -> torch.nn.Module:
    if phase == "text encoding":
        return model.text_encoders[0].model
    if phase == "sampling":
        return model.unet
    return model.vae.decoder


@contextlib.contextmanager
def during(module: torch.nn.Module, action: Callable[[int], None]) -> Iterator[list[int]]:
    """Call action(n) as the n-th (0-based) forward of `module` starts; yields the running call count."""
    calls = [0]

    def hook(*_):
        action(calls[0])
        calls[0] += 1

    handle = module.register_forward_pre_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


class Flags:
    def __init__(self):
        self.stop = self.skip = False

    def should_stop(self) -> bool:
        return self.stop

    def should_skip(self) -> bool:
        """Consumed when read, as the server's job does: a skip drops one batch."""
        asked, self.skip = self.skip, False
        return asked


def run(model, flags: Flags):
    images = []
    try:
        result = txt2img(model, PARAMS, should_stop=flags.should_stop, should_skip=flags.should_skip,
                         on_image=images.append)
    except Interrupted as stop:
        return images, stop.result, True
    return images, result, False


def test_interrupt_during_text_encoding_samples_nothing(mini):
    flags = Flags()
    with during(phase_module(mini, "text encoding"), lambda n: setattr(flags, "stop", True)), \
            during(mini.unet, lambda n: None) as unet_calls:
        images, result, interrupted = run(mini, flags)
    assert interrupted and images == [] and result.images == []
    assert unet_calls[0] == 0


def test_interrupt_during_sampling_keeps_finished_batches(mini):
    flags = Flags()

    def at(call: int) -> None:
        if call == STEPS + 1:  # the second step of batch 2 (batch 1 took STEPS calls)
            flags.stop = True

    with during(mini.unet, at) as unet_calls:
        images, result, interrupted = run(mini, flags)
    assert interrupted
    assert [image.index for image in images] == [0] == [image.index for image in result.images]
    assert unet_calls[0] == STEPS + 2  # stopped right after the step that asked


def test_interrupt_during_decoding_keeps_that_batch_and_stops(mini):
    flags = Flags()
    with during(phase_module(mini, "decoding"), lambda n: setattr(flags, "stop", True)), \
            during(mini.unet, lambda n: None) as unet_calls:
        images, result, interrupted = run(mini, flags)
    assert interrupted
    assert [image.index for image in images] == [0]  # the decoded batch is delivered, nothing is lost
    assert unet_calls[0] == STEPS  # batch 2 never started


@pytest.mark.parametrize(("phase", "kept"), [("text encoding", [1]), ("sampling", [1]), ("decoding", [0, 1])])
def test_skip_in_each_phase(mini, phase, kept):
    """A skip drops the batch being encoded or sampled; one that comes while a batch decodes (the batch is done)
    is dropped instead, so that batch is kept and the next one is not skipped in its place."""
    flags = Flags()

    def at(call: int) -> None:
        if call == 0:
            flags.skip = True

    with during(phase_module(mini, phase), at):
        images, result, interrupted = run(mini, flags)
    assert not interrupted
    assert [image.index for image in images] == kept
    assert [image.seed for image in images] == [PARAMS.seed + index for index in kept]


# -- NaN ------------------------------------------------------------------------------------------------------


def nan_output(module: torch.nn.Module, from_call: int = 0):
    """Make `module` return NaN from its `from_call`-th forward on (a broken layer of a checkpoint)."""
    calls = [0]

    def hook(_module, _inputs, output):
        calls[0] += 1
        if calls[0] <= from_call:
            return None
        return torch.full_like(output, float("nan"))

    return module.register_forward_hook(hook)


NAN_SITES = {
    "text encoding": lambda model: next(m for name, m in model.text_encoders[0].model.named_modules()
                                        if name.endswith("embeddings")),
    "sampling": lambda model: model.unet.conv_out,
    "decoding": lambda model: model.vae.decoder.conv_out,
}


@pytest.mark.parametrize("phase", list(NAN_SITES))
def test_nan_is_a_clear_error_not_a_black_image(mini, phase):
    images = []
    handle = nan_output(NAN_SITES[phase](mini))
    try:
        with pytest.raises(NumericalError) as error:
            txt2img(mini, PARAMS, on_image=images.append)
    finally:
        handle.remove()
    assert error.value.phase == phase
    assert f"the model produced NaN during {phase}" in str(error.value)
    assert error.value.step == (1 if phase == "sampling" else None)
    assert images == []  # no black image was handed out


def test_nan_in_a_later_batch_keeps_the_earlier_images(mini):
    images = []
    handle = nan_output(mini.vae.decoder.conv_out, from_call=1)  # the first decode is fine, the second is NaN
    try:
        with pytest.raises(NumericalError, match="during decoding"):
            txt2img(mini, PARAMS, on_image=images.append)
    finally:
        handle.remove()
    assert [image.index for image in images] == [0]
    assert image_not_blank(images[0].image)


def image_not_blank(image) -> bool:
    low, high = zip(*image.getextrema(), strict=True)
    return max(high) - min(low) > 10


def test_without_faults_the_same_job_makes_both_images(mini):
    """Control for the tests above: the hooks, not the job, cause what they see."""
    images, result, interrupted = run(mini, Flags())
    assert not interrupted and [image.index for image in images] == [0, 1]
    assert all(image_not_blank(image.image) for image in images)


def test_cli_reports_nan_in_one_line_and_saves_nothing(monkeypatch, capsys, tmp_path):
    """Through `difusi generate`: exit 1 (the command line was fine, the run failed), one line, no image."""
    import difusi.models
    from difusi import cli

    real_load = difusi.models.load_model

    def load_broken(*args, **kwargs):
        model = real_load(*args, **kwargs)
        nan_output(model.unet.conv_out, from_call=2)  # steps 1 and 2 (one CFG call each) fine, step 3 NaN
        return model

    monkeypatch.setattr(difusi.models, "load_model", load_broken)
    outputs = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "a cat", "--steps", "4", "--sampler", "Euler", "--outputs-dir", str(outputs)])
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if not line.startswith("difusi: step ")]
    assert exit_info.value.code == 1 and captured.out == ""
    assert errors == [errors[0]] and errors[0].startswith(
        "difusi: error: the model produced NaN during sampling (step 3), so the image would be blank")
    assert list(outputs.glob("*/*.png")) == []


def test_http_reports_nan_as_json_and_saves_nothing(http, bad_files, monkeypatch):
    import difusi.pipeline as pipeline

    real_decode = pipeline.decode_latents

    def broken_decode(*args, **kwargs):
        return torch.full_like(real_decode(*args, **kwargs), float("nan"))

    before = sorted(bad_files.outputs.glob("*/*.png"))
    monkeypatch.setattr(pipeline, "decode_latents", broken_decode)
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "nan over http", "steps": 2, "seed": 3})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "NumericalError" and body["field"] == "sd_model_checkpoint"
    assert body["detail"].startswith("the model produced NaN during decoding")
    assert sorted(bad_files.outputs.glob("*/*.png")) == before
    monkeypatch.setattr(pipeline, "decode_latents", real_decode)
    assert http.post("/sdapi/v1/txt2img", json={"prompt": "fine again", "steps": 2, "seed": 3}).status_code == 200
