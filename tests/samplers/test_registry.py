"""Sampler names: A1111 names, aliases, ComfyUI names, legacy combined names, listing shapes."""

import json

import pytest
import torch

from difusi.errors import ParamError
from difusi.samplers import dpm, dpmpp, euler, get_sampler, list_samplers, list_schedules, multistep

A1111_NAMES = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM fast", "DPM adaptive", "DPM++ 2S a",
               "DPM++ SDE", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE", "DDIM", "PLMS",
               "UniPC", "LCM", "Restart"]
A1111_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                   "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]


@pytest.mark.parametrize("name", A1111_NAMES)
def test_every_a1111_name_resolves_to_itself(name):
    assert get_sampler(name).name == name
    assert get_sampler(name.upper()).name == name


@pytest.mark.parametrize(
    ("alias", "name"),
    [("k_euler", "Euler"), ("k_euler_a", "Euler a"), ("k_heun", "Heun"), ("k_dpm_2", "DPM2"), ("k_dpm_2_a", "DPM2 a"),
     ("k_lms", "LMS"), ("k_dpm_fast", "DPM fast"), ("k_dpm_ad", "DPM adaptive"), ("k_dpmpp_2s_a", "DPM++ 2S a"),
     ("k_dpmpp_sde", "DPM++ SDE"), ("k_dpmpp_2m", "DPM++ 2M"), ("k_dpmpp_2m_sde", "DPM++ 2M SDE"),
     ("k_dpmpp_3m_sde", "DPM++ 3M SDE"), ("euler", "Euler"), ("euler_ancestral", "Euler a"), ("heun", "Heun"),
     ("dpm_2", "DPM2"), ("dpm_2_ancestral", "DPM2 a"), ("lms", "LMS"), ("dpm_fast", "DPM fast"),
     ("dpm_adaptive", "DPM adaptive"), ("dpmpp_2s_ancestral", "DPM++ 2S a"), ("dpmpp_sde", "DPM++ SDE"),
     ("dpmpp_2m", "DPM++ 2M"), ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("dpmpp_3m_sde", "DPM++ 3M SDE"), ("ddim", "DDIM"),
     ("uni_pc", "UniPC"), ("lcm", "LCM"), ("restart", "Restart"), ("plms", "PLMS")],
)
def test_aliases_and_comfyui_names(alias, name):
    assert get_sampler(alias).name == name


def test_uni_pc_bh2_is_unipc_with_bh2():
    sampler = get_sampler("uni_pc_bh2")
    assert sampler.function is multistep.sample_unipc_bh2 and sampler.options["variant"] == "bh2"
    assert get_sampler("UniPC").options["variant"] == "bh1"


@pytest.mark.parametrize(
    ("legacy", "name", "schedule"),
    [("DPM++ 2M Karras", "DPM++ 2M", "Karras"), ("Euler a Karras", "Euler a", "Karras"),
     ("DPM++ SDE Karras", "DPM++ SDE", "Karras"), ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "Exponential"),
     ("dpm++ 2m sde karras", "DPM++ 2M SDE", "Karras"), ("k_dpmpp_2m_ka", "DPM++ 2M", "Karras"),
     ("DPM2 a Karras", "DPM2 a", "Karras"), ("LMS Karras", "LMS", "Karras")],
)
def test_legacy_combined_names(legacy, name, schedule):
    sampler = get_sampler(legacy)
    assert (sampler.name, sampler.schedule_override) == (name, schedule)
    assert get_sampler(name).schedule_override is None


@pytest.mark.parametrize("bad", ["Euler b", "", "DPM++ 4M", "karras", None, 3])
def test_unknown_sampler_lists_valid_names(bad):
    with pytest.raises(ParamError) as info:
        get_sampler(bad)
    assert info.value.field == "sampler_name"
    assert "Euler a" in str(info.value) and "DPM++ 2M" in str(info.value)


def test_functions_and_flags():
    assert get_sampler("Euler a").function is euler.sample_euler_ancestral
    assert get_sampler("DPM2").function is dpm.sample_dpm_2
    assert get_sampler("DPM++ 2M SDE Heun").options["solver_type"] == "heun"
    assert get_sampler("DPM++ 2M SDE").function is dpmpp.sample_dpmpp_2m_sde
    brownian = {s.name for s in list_samplers() if s.uses_brownian_noise}
    assert brownian == {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}
    discard = {s.name for s in list_samplers() if s.discard_penultimate_sigma}
    assert {"DPM2", "DPM2 a", "DPM++ 3M SDE", "UniPC"} <= discard
    assert not get_sampler("DPM++ 2M").stochastic and get_sampler("Euler a").stochastic


def test_a1111_default_schedules():
    defaults = {s.name: s.default_schedule for s in list_samplers()}
    assert defaults["DPM++ 2M"] == "Karras" and defaults["DPM++ SDE"] == "Karras"
    assert defaults["DPM++ 2M SDE"] == "Exponential" and defaults["DPM++ 3M SDE"] == "Exponential"
    assert defaults["Euler a"] == "Uniform" and defaults["DDIM"] == "DDIM" and defaults["Restart"] == "Karras"


def test_listing_shapes_for_the_http_api():
    entries = [s.to_a1111() for s in list_samplers()]
    assert [e["name"] for e in entries][: len(A1111_NAMES)] != []
    assert set(A1111_NAMES) <= {e["name"] for e in entries}
    for entry in entries:
        assert set(entry) == {"name", "aliases", "options"} and isinstance(entry["aliases"], list)
    json.dumps(entries + [s.to_a1111() for s in list_schedules()], allow_nan=False)  # what the HTTP API sends
    dpmpp_2m = get_sampler("DPM++ 2M").to_a1111()
    assert dpmpp_2m["options"]["scheduler"] == "karras" and "k_dpmpp_2m" in dpmpp_2m["aliases"]
    assert get_sampler("DPM2").to_a1111()["options"]["discard_next_to_last_sigma"] is True
    schedules = [s.to_a1111() for s in list_schedules()]
    assert [s["label"] for s in schedules][: len(A1111_SCHEDULES)] == A1111_SCHEDULES
    for entry in schedules:
        assert set(entry) == {"name", "label", "aliases", "default_rho", "need_inner_model"}


@pytest.mark.parametrize("sampler", list_samplers(), ids=lambda s: s.name)
def test_function_defaults_equal_registry_options(sampler):
    """Pipelines may call `sampler.function` directly: its keyword defaults must be the registry's options."""
    import inspect

    params = inspect.signature(sampler.function).parameters
    for name, value in sampler.options.items():
        assert params[name].default == value, (sampler.name, name)


def test_sampler_call_uses_registry_defaults_and_rejects_unknown_options(mixture):
    sigmas = torch.tensor([5.0, 1.0, 0.0], dtype=torch.float64)
    x = torch.ones(2, 2, dtype=torch.float64) * 5
    sampler = get_sampler("DDIM")
    assert torch.equal(sampler(mixture, x, sigmas), euler.sample_euler(mixture, x, sigmas))
    with pytest.raises(ParamError) as info:
        sampler(mixture, x, sigmas, s_churn=1.0)
    assert info.value.field == "s_churn" and "eta" in str(info.value)
