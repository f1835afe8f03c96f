"""A1111 request mapping and response helpers (no server, no model)."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import ValidationError

from difusi.errors import ParamError
from difusi.params import GenerationParams
from difusi.server import a1111

# The body the A1111 web UI's API docs show for txt2img (keys as of A1111 1.9/1.10), with typical values.
A1111_CLIENT_BODY = {
    "prompt": "a cat", "negative_prompt": "blurry", "styles": [], "seed": 42, "subseed": -1,
    "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler a",
    "scheduler": "Karras", "batch_size": 2, "n_iter": 3, "steps": 12, "cfg_scale": 5.5, "width": 64, "height": 96,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None, "s_tmin": None,
    "s_noise": None, "override_settings": {"sd_model_checkpoint": "difusi-mini", "CLIP_stop_at_last_layers": 2},
    "override_settings_restore_afterwards": True, "refiner_checkpoint": None, "refiner_switch_at": None,
    "disable_extra_networks": False, "firstpass_image": None, "comments": None, "enable_hr": False,
    "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None,
    "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None, "sampler_index": "Euler",
    "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {}, "infotext": None,
}


def test_full_a1111_body_maps_known_fields_and_ignores_the_rest():
    job = a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate(A1111_CLIENT_BODY))
    p = job.params
    assert (p.prompt, p.negative_prompt, p.seed, p.subseed) == ("a cat", "blurry", 42, -1)
    assert (p.sampler_name, p.scheduler, p.steps, p.cfg_scale) == ("Euler a", "Karras", 12, 5.5)
    assert (p.width, p.height, p.batch_size, p.n_iter, p.clip_skip) == (64, 96, 2, 3, 2)
    # nulls keep difusi's defaults
    defaults = GenerationParams()
    assert (p.eta, p.s_noise, p.s_churn) == (defaults.eta, defaults.s_noise, defaults.s_churn)
    assert job.checkpoint == "difusi-mini" and job.save_images is False and job.send_images is True


def test_defaults_sampler_index_and_save_default():
    job = a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate({"sampler_index": "DDIM"}))
    assert job.params.sampler_name == "DDIM"
    assert job.save_images is True  # difusi saves API images unless told not to (A1111's API defaults to false)
    assert job.checkpoint is None and job.params.steps == GenerationParams().steps
    job = a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate({}), {"clip_skip": 3}, save_default=False)
    assert job.params.clip_skip == 3 and job.save_images is False


@pytest.mark.parametrize(
    ("body", "field"),
    [({"steps": "many"}, "steps"), ({"cfg_scale": [1]}, "cfg_scale"), ({"prompt": 5}, "prompt"), ({"seed": 1.5}, "seed")],
)
def test_wrong_types_name_the_field(body, field):
    with pytest.raises(ValidationError) as caught:
        a1111.Txt2ImgRequest.model_validate(body)
    assert caught.value.errors()[0]["loc"][0] == field


def test_bad_checkpoint_override_names_the_field():
    with pytest.raises(ParamError) as caught:
        a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate({"override_settings": {"sd_model_checkpoint": 7}}))
    assert caught.value.field == "sd_model_checkpoint"


def test_echoed_parameters_are_json_safe_and_keep_the_request():
    job = a1111.to_txt2img_job(a1111.Txt2ImgRequest.model_validate({"prompt": "x", "seed": -1, "foo": "bar"}))
    echoed = a1111.echo_parameters(job)
    json.dumps(echoed, allow_nan=False)  # would raise on inf/nan
    assert echoed["seed"] == -1 and echoed["prompt"] == "x" and echoed["foo"] == "bar"


def test_build_info_lists_all_seeds_and_a1111_keys():
    params = GenerationParams(prompt="p", seed=10, subseed=5, width=64, height=64, batch_size=2, n_iter=2)
    info = a1111.build_info(params, [10, 11, 12, 13], [5, 6, 7, 8], ["t0", "t1", "t2", "t3"], "mini", "abc", "20260101000000")
    assert info["seed"] == 10 and info["all_seeds"] == [10, 11, 12, 13]
    assert info["subseed"] == 5 and info["all_subseeds"] == [5, 6, 7, 8]
    assert info["all_prompts"] == ["p"] * 4 and info["infotexts"] == ["t0", "t1", "t2", "t3"]
    for key in ("negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
                "batch_size", "n_iter", "sd_model_name", "sd_model_hash", "job_timestamp"):
        assert key in info


def _png_b64(text: str | None) -> str:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


def test_decode_image_accepts_data_urls_and_raw_base64():
    raw = _png_b64("hello")
    for data in (raw, "data:image/png;base64," + raw):
        image = a1111.decode_image(data)
        assert image.size == (4, 4) and a1111.png_text_items(image)["parameters"] == "hello"


@pytest.mark.parametrize("data", ["", "not base64 at all!!", base64.b64encode(b"plain text").decode()])
def test_decode_image_rejects_garbage_with_field(data):
    with pytest.raises(ParamError) as caught:
        a1111.decode_image(data)
    assert caught.value.field == "image"
