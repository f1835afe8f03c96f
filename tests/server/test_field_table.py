"""The field table (difusi.params.FIELDS) reaches every front end, and nothing drifts.

Every field gets a non-default value derived from its own declaration (so a new field is covered the moment it is
declared), and the whole set travels, once per request kind (txt2img with hires fix; img2img with a mask, i.e.
inpainting): CLI flags -> params -> infotext -> params -> HTTP request (a real server, real images) -> the images'
infotext and the echoed parameters -> params. Each leg must give back every value of its kind.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import dataclass

import pytest
from PIL import Image, ImageDraw
from tests.server.conftest import VAE_FILE

from difusi import cli
from difusi.infotext import KEY_TO_FIELD, format_infotext, recipe_from_infotext
from difusi.params import (
    FIELDS,
    INPAINT,
    JOB_KINDS,
    LIMITS,
    PICTURE_KINDS,
    TXT2IMG,
    FieldSpec,
    GenerationParams,
    field_table,
)
from difusi.server import a1111

# Values the generic rule below cannot pick: sizes that suit a 64-px model and cost little, a clip skip the tiny text
# encoder has layers for, and few steps and images so the HTTP leg stays cheap.
CONSTRAINED = {"width": 128, "height": 64, "steps": 3, "batch_size": 2, "n_iter": 2, "clip_skip": 2,
               "hr_resize_x": 160, "hr_resize_y": 96, "hr_second_pass_steps": 2, "outpaint_pixels": 8,
               "outpaint_directions": "left"}
NOT_IN_INFOTEXT = {"batch_size", "n_iter", "model", "backend", "enable_hr", "mask_blur_x", "mask_blur_y",
                   "outpaint_pixels", "outpaint_directions"}
"""A1111 writes no batch size/count into an image's infotext; the checkpoint is written as Model/Model hash and
selects the model instead of setting a field; the UNet backend computes the same numbers, so it is not written.
Hires fix is read from the presence of its keys (no key of its own); "Mask blur" is one number (the x / y blurs
are API-only); outpainting turns into the canvas and mask the image was made from."""
SHADOWED = {"hr_scale"}
"""Written only without a hires resize (A1111 writes one of "Hires upscale" / "Hires resize"); the sample has one."""
SENT_APART = {"outpaint_pixels", "outpaint_directions"}
"""Outpainting rewrites the job (canvas size, mask blur, area: A1111's script): the HTTP leg checks their mapping
and sends the inpaint leg without them, so every other value can come back unchanged."""


@dataclass(frozen=True)
class Leg:
    command: str
    kinds: frozenset[str]
    request: type
    url: str
    infotext_kind: str

    @property
    def fields(self) -> list[str]:
        return [name for name, spec in FIELDS.items() if spec.kinds & self.kinds]


LEGS = {
    "txt2img": Leg("generate", frozenset({TXT2IMG}), a1111.Txt2ImgRequest, "/sdapi/v1/txt2img", TXT2IMG),
    "inpaint": Leg("img2img", PICTURE_KINDS, a1111.Img2ImgRequest, "/sdapi/v1/img2img", INPAINT),
}


def sample_value(spec: FieldSpec):
    """A valid value different from the default, chosen from the declaration alone."""
    if spec.name in CONSTRAINED:
        return CONSTRAINED[spec.name]
    if spec.choices == "samplers":
        return "Euler a"
    if spec.choices == "schedulers":
        return "Karras"
    if spec.choices == "checkpoints":
        return "difusi-mini"
    if spec.choices == "vaes":
        return VAE_FILE  # in the test server's VAE folder
    if spec.choices == "backends":
        return "torch"
    if spec.choices == "unet_precisions":
        return "bf16"
    if spec.choices == "upscalers":
        return "Latent (nearest)"
    if spec.type is bool:
        return not spec.default
    if spec.choices == "rng_sources":
        return "NV"  # A1111's CUDA emulation: computed on the CPU, so the real server below can make the images
    if spec.type is str:
        return f"a {spec.name} text, (red:1.2)"
    low, high = spec.range
    value = low + 1.5 if math.isinf(high) else low + (high - low) * 0.25
    if spec.type is int:
        value = int(value)
    return value if value != spec.default else value + 1


SAMPLE = {name: sample_value(spec) for name, spec in FIELDS.items()}


def assert_same_fields(params: GenerationParams, names, where: str) -> None:
    got = {name: getattr(params, name) for name in names}
    want = {name: SAMPLE[name] for name in names}
    assert got == want, f"{where}: fields differ"


def test_every_sample_differs_from_its_default_and_validates():
    for name, spec in FIELDS.items():
        assert SAMPLE[name] != spec.default, name
    checked = GenerationParams(**SAMPLE).validated()  # the Python API takes them as they are
    assert_same_fields(checked, FIELDS, "Python API")


def test_the_table_is_the_one_source_of_ranges_flags_and_infotext_keys():
    assert LIMITS == {name: spec.range for name, spec in FIELDS.items() if spec.range is not None}
    assert cli.FIELD_FLAGS == {name: spec.flags[0] for name, spec in FIELDS.items() if spec.flags}
    assert set(KEY_TO_FIELD.values()) == set(FIELDS) - NOT_IN_INFOTEXT
    for leg in LEGS.values():
        request_keys = set(leg.request.model_fields)
        assert {name for name in leg.fields if FIELDS[name].http} <= request_keys, leg.command
        assert "model" not in request_keys  # the checkpoint travels as override_settings.sd_model_checkpoint
        assert not {name for name, spec in FIELDS.items() if not spec.kinds & leg.kinds} & request_keys
    assert [entry["name"] for entry in field_table()] == list(FIELDS)
    assert set().union(*(spec.kinds for spec in FIELDS.values())) == set(JOB_KINDS)


def picture_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def cli_params(leg: Leg) -> GenerationParams:
    argv = [leg.command] + (["in.png"] if leg.command == "img2img" else [])
    for name in leg.fields:
        spec, value = FIELDS[name], SAMPLE[name]
        if spec.type is bool:
            argv += [spec.flags[0] if value else "--no-" + spec.flags[0].removeprefix("--")]
        else:
            argv += [str(value)] if spec.flags[0] == "PROMPT" else [spec.flags[0], str(value)]
    args = cli.build_parser().parse_args(argv)
    params, recipe = cli._generation_params(args)
    assert recipe is None
    return params


@pytest.mark.parametrize("leg_name", list(LEGS))
def test_round_trip_cli_infotext_http_and_back(client, leg_name):
    leg = LEGS[leg_name]
    names = set(leg.fields)
    # CLI flags -> params
    from_cli = cli_params(leg)
    assert_same_fields(from_cli, names, "CLI")

    # params -> infotext -> params
    # A job writes "VAE" only once its file is loaded (the HTTP leg below checks a real job's text).
    text = format_infotext(from_cli, seed=from_cli.seed, subseed=from_cli.subseed, model_name="difusi-mini",
                           model_hash="0123456789", extra={"VAE": from_cli.sd_vae}, kind=leg.infotext_kind)
    recipe = recipe_from_infotext(text)
    assert recipe.ignored == [] and recipe.model_name == "difusi-mini"
    in_text = names - NOT_IN_INFOTEXT - SHADOWED
    assert_same_fields(recipe.params(), in_text, "infotext")

    # params -> HTTP request body -> params (the mapping alone, then a real server making real images)
    body = {name: getattr(from_cli, name) for name in leg.fields if FIELDS[name].http}
    body["override_settings"] = {FIELDS["model"].option: from_cli.model}
    body["save_images"] = False
    if leg.request is a1111.Img2ImgRequest:
        picture = Image.new("RGB", (96, 64), "navy")
        mask = Image.new("L", picture.size)
        ImageDraw.Draw(mask).rectangle((20, 16, 60, 40), fill=255)
        body.update(init_images=[picture_b64(picture)], mask=picture_b64(mask))
    job = (a1111.to_img2img_job if leg.request is a1111.Img2ImgRequest else a1111.to_txt2img_job)(
        leg.request.model_validate(json.loads(json.dumps(body))))
    assert_same_fields(job.params, names - {"model"}, "HTTP request")
    assert job.checkpoint == SAMPLE["model"]

    for name in SENT_APART & names:
        body[name] = FIELDS[name].default
    response = client.post(leg.url, json=body)
    assert response.status_code == 200, response.text
    reply = response.json()
    info = json.loads(reply["info"])
    assert len(reply["images"]) == SAMPLE["batch_size"] * SAMPLE["n_iter"]
    assert info["all_seeds"][0] == SAMPLE["seed"] and info["all_subseeds"][0] == SAMPLE["subseed"]
    echoed, _ = GenerationParams.from_mapping({k: v for k, v in reply["parameters"].items() if k in FIELDS})
    assert_same_fields(echoed, names - {"model"} - SENT_APART, "echoed parameters")
    back = recipe_from_infotext(info["infotexts"][0])
    assert back.ignored == [] and back.model_name == "difusi-mini"
    # The sample runs on torch, where the bf16 graph shortcut cannot apply: the image says fp32 and a warning why.
    assert_same_fields(back.params(), in_text - {"unet_precision"}, "the image's infotext")
    assert back.params().unet_precision == "fp32"
    assert any("unet_precision bf16 was not applied" in warning for warning in info.get("warnings", [])), info


def test_fields_endpoint_serves_the_table(client):
    table = client.get("/difusi/v1/fields").json()
    assert table["kinds"] == list(JOB_KINDS)
    by_name = {entry["name"]: entry for entry in table["fields"]}
    assert list(by_name) == list(FIELDS)
    steps = by_name["steps"]
    assert (steps["type"], steps["min"], steps["max"], steps["default"], steps["flags"], steps["infotext"]) == (
        "integer", 1, 1000, 20, ["--steps"], "Steps")
    assert by_name["s_tmax"]["max"] is None and by_name["s_tmax"]["default"] is None  # JSON has no infinity
    assert by_name["width"]["nullable"] and by_name["width"]["multiple_of"] == 8
    bad = client.get("/difusi/v1/fields", params={"kind": "nope"})
    assert bad.status_code == 422 and bad.json()["field"] == "kind"


def test_openapi_request_schema_comes_from_the_table(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    for name, spec in FIELDS.items():
        if not spec.http or TXT2IMG not in spec.kinds:
            continue
        assert name in schema, name
        if spec.range is not None and not math.isinf(spec.range[1]):
            assert schema[name]["maximum"] == spec.range[1], name
    for mode in ("s_min_uncond", "token_merging_ratio", "deepcache_interval"):  # were missing from the schema
        assert mode in schema


@pytest.mark.parametrize("leg_name", list(LEGS))
def test_cli_help_lists_every_flag_with_its_range(capsys, leg_name):
    leg = LEGS[leg_name]
    with pytest.raises(SystemExit):
        cli.main([leg.command, "--help"])
    shown = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    described = shown[shown.index("positional arguments:"):]  # past the usage block
    for spec in (FIELDS[name] for name in leg.fields):
        suffix = ", " if spec.type is bool else " "  # a bool flag is listed with its --no- form
        entry = described[described.index(spec.flags[0] + suffix):]
        assert spec.help.split(" (")[0] in entry[:300], spec.name
        if spec.range is not None:
            assert spec.range_text() in entry[:300], spec.name
