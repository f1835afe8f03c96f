"""Which prompt-schedule step each model call uses, for first- and second-order samplers (issue 13, item 6).

The rule (A1111's, see `difusi.pipeline._ScheduledCFG`): the CFG denoiser counts its own model calls, call k
uses schedule step k, and the schedule is built for 2x steps for A1111's "second_order" samplers. Progress
callbacks play no part. Each pipeline run below is checked against a loop written here from the published
update equations (Karras et al. 2022 Alg. 2 for Heun, k-diffusion's sample_dpm_2 and sample_dpmpp_sde),
calling CFG with the conditioning the rule gives for each call; the per-call texts are written out literally
so that a rule change fails.
"""

from types import SimpleNamespace

import pytest
import torch

import difusi.pipeline as pipeline
from difusi.params import GenerationParams
from difusi.pipeline import _schedule_steps, _ScheduledCFG, txt2img
from difusi.prompts.conditioning import Conditioning, conditioning_at, encode_prompt
from difusi.prompts.parser import get_prompt_schedule
from difusi.rng import image_noise
from difusi.samplers import build_sigmas, get_sampler, list_samplers
from difusi.samplers.denoiser import DiscreteNoiseTable
from difusi.samplers.noise import BrownianNoiseSampler

STEPS = 5  # odd: int(0.5 * 2 * 5) = 5 != 2 * int(0.5 * 5) = 4, so A1111's per-call rule and difusi's old
# callback-advanced step differ for `[cat:dog:0.5]`
SEED = 7
CFG_SCALE = 5.0
PROMPTS = {"edit": "a [cat:dog:0.5]", "alternate": "a [cat|dog]"}
CAT, DOG = "a cat", "a dog"

# Text per model call. Euler: one call per step, schedule of 5 steps: `when` = int(2.5) = 2, so steps 0-2 see
# "cat"; alternation entries t = 1..5 give cat, dog, cat, ... with step i using the first t >= i.
# Second order: 9 calls (2 per step, 1 on the last step to sigma 0), schedule of 10 steps: `when` = 5, so calls
# 0-5 see "cat" (step 2's first call "cat", its second "dog"); alternation switches on every call.
FIRST_ORDER = {"edit": [CAT, CAT, CAT, DOG, DOG], "alternate": [CAT, CAT, DOG, CAT, DOG]}
SECOND_ORDER = {"edit": [CAT] * 6 + [DOG] * 3, "alternate": [CAT, CAT, DOG, CAT, DOG, CAT, DOG, CAT, DOG]}
EXPECTED_TEXTS = {"Euler": FIRST_ORDER, "Heun": SECOND_ORDER, "DPM2": SECOND_ORDER, "DPM++ SDE": SECOND_ORDER}

A1111_SECOND_ORDER = {"Heun", "DPM2", "DPM2 a", "DPM++ SDE", "DPM++ 2S a", "Restart"}
"""A1111's samplers with "second_order": True (modules/sd_samplers_kdiffusion.py, sd_samplers_extra.py)."""


def _params(sampler_name: str, prompt: str, **changes) -> GenerationParams:
    base = dict(prompt=prompt, negative_prompt="", seed=SEED, steps=STEPS, cfg_scale=CFG_SCALE, width=64,
                height=64, sampler_name=sampler_name)
    return GenerationParams(**{**base, **changes})


def _rule_text(prompt: str, sampler_name: str, call: int) -> str:
    """The text the rule gives model call `call`: entry `call` of the schedule built for total_steps."""
    total = STEPS * 2 if sampler_name in A1111_SECOND_ORDER else STEPS
    schedule = get_prompt_schedule(prompt, total)
    return next((text for end, text in schedule if call <= end), schedule[0][1])


# ----------------------------------------------------------------------------- the hand-written loops


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def _heun(model, x, sigmas, noise):
    """Karras et al. 2022, Algorithm 2 with S_churn = 0; the step to sigma = 0 is an Euler step."""
    for i in range(len(sigmas) - 1):
        d = _to_d(x, sigmas[i], model(x, sigmas[i]))
        dt = sigmas[i + 1] - sigmas[i]
        x_next = x + d * dt
        if sigmas[i + 1] != 0:
            d_next = _to_d(x_next, sigmas[i + 1], model(x_next, sigmas[i + 1]))
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
    return x


def _euler(model, x, sigmas, noise):
    for i in range(len(sigmas) - 1):
        x = x + _to_d(x, sigmas[i], model(x, sigmas[i])) * (sigmas[i + 1] - sigmas[i])
    return x


def _dpm_2(model, x, sigmas, noise):
    """k-diffusion's sample_dpm_2 (churn 0): midpoint step at the log-mean of sigma_i and sigma_{i+1}."""
    for i in range(len(sigmas) - 1):
        d = _to_d(x, sigmas[i], model(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
            continue
        sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
        x_2 = x + d * (sigma_mid - sigmas[i])
        d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid))
        x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def _ancestral_step(sigma_from, sigma_to, eta=1.0):
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _dpmpp_sde(model, x, sigmas, noise, r=0.5):
    """k-diffusion's sample_dpmpp_sde (eta 1, s_noise 1, r 1/2), fed the pipeline's Brownian draws (`_replay`)."""
    def sigma_fn(t):
        return t.neg().exp()

    def t_fn(sigma):
        return sigma.log().neg()

    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = _ancestral_step(sigma_fn(t), sigma_fn(s))
        s_ = t_fn(sd)
        x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(sigma_fn(t), sigma_fn(s)) * su
        denoised_2 = model(x_2, sigma_fn(s))
        sd, su = _ancestral_step(sigma_fn(t), sigma_fn(t_next))
        t_next_ = t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(sigma_fn(t), sigma_fn(t_next)) * su
    return x


LOOPS = {"Euler": _euler, "Heun": _heun, "DPM2": _dpm_2, "DPM++ SDE": _dpmpp_sde}


def _replay(draws):
    """A noise sampler returning the pipeline's Brownian draws in order ("the same noise sampler in both").

    It checks that each query is the pipeline's up to float rounding: k-diffusion queries at sigma_fn(t_fn(sigma)),
    difusi's sampler at sigma itself, one float32 ulp apart, which a Brownian tree turns into visibly different
    increments; that difference is not what this file tests."""
    queue = list(draws)

    def noise(sigma, sigma_next):
        (a, b), drawn = queue.pop(0)
        torch.testing.assert_close((float(sigma), float(sigma_next)), (a, b), rtol=1e-5, atol=0)
        return drawn

    return noise


def _hand_written(model, sampler_name, prompt, draws=()):
    """The loop of LOOPS[sampler_name] over eps-prediction CFG (Ho & Salimans 2022) with the rule's text per call.

    Returns (final latents, texts used per call)."""
    table = DiscreteNoiseTable()
    sampler = get_sampler(sampler_name)
    sigmas = build_sigmas(sampler, "Automatic", STEPS, table).float()
    shape = (model.latent_channels, 64 // model.vae_scale_factor, 64 // model.vae_scale_factor)
    x = image_noise([SEED], shape).noise * sigmas[0]
    noise = _replay(draws)
    encoded = {text: encode_prompt(model.text_encoders, text).context for text in (CAT, DOG, "")}
    texts = []

    def cfg(x, sigma):
        text = _rule_text(prompt, sampler_name, len(texts))
        texts.append(text)
        c_in = 1 / (sigma**2 + 1) ** 0.5
        t = table.sigma_to_t(sigma.reshape(1)).expand(2)
        eps = model.unet(torch.cat([x, x]) * c_in, t, encoder_hidden_states=torch.cat([encoded[""], encoded[text]])).sample
        eps_uncond, eps_cond = eps.chunk(2)
        uncond, cond = x - eps_uncond * sigma, x - eps_cond * sigma
        return uncond + (cond - uncond) * CFG_SCALE

    with torch.inference_mode():
        return LOOPS[sampler_name](cfg, x, sigmas, noise), texts


def _pipeline(model, monkeypatch, sampler_name, prompt, **changes):
    """txt2img's final latents, the cond context and batch size of every UNet call, and its Brownian draws."""
    calls, final, draws = [], {}, []
    original_forward, original_decode = model.unet.forward, pipeline.decode_latents

    class RecordingBrownian(BrownianNoiseSampler):
        def __call__(self, sigma, sigma_next):
            drawn = super().__call__(sigma, sigma_next)
            draws.append(((float(sigma), float(sigma_next)), drawn.clone()))
            return drawn

    def recording_forward(sample, timestep, encoder_hidden_states=None, **kwargs):
        calls.append((encoder_hidden_states[-1].clone(), sample.shape[0]))  # rows are [uncond, cond]
        return original_forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    def keep_latents(vae, latents, scaling_factor):
        final["latents"] = latents.clone()
        return original_decode(vae, latents, scaling_factor)

    monkeypatch.setattr(pipeline, "decode_latents", keep_latents)
    monkeypatch.setattr(pipeline, "BrownianNoiseSampler", RecordingBrownian)
    patched_before = vars(model.unet).get("forward")
    model.unet.forward = recording_forward
    try:
        txt2img(model, _params(sampler_name, prompt, **changes))
    finally:
        if patched_before is None:
            del model.unet.forward  # back to the class's forward, as the speed modes expect
        else:
            model.unet.forward = patched_before
    return final["latents"], calls, draws


@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("sampler_name", list(LOOPS))
def test_prompt_schedule_per_model_call_matches_a_hand_written_loop(tiny_models, monkeypatch, sampler_name, kind):
    model = tiny_models("sd1")
    prompt = PROMPTS[kind]
    expected_texts = EXPECTED_TEXTS[sampler_name][kind]
    ours, calls, draws = _pipeline(model, monkeypatch, sampler_name, prompt)  # first: txt2img prepares the fast path
    reference, texts = _hand_written(model, sampler_name, prompt, draws)  # on the same (prepared) modules
    assert len(draws) == (2 * (STEPS - 1) if get_sampler(sampler_name).uses_brownian_noise else 0)
    assert texts == expected_texts, "the hand-written loop follows the rule written out above"
    with torch.inference_mode():
        encoded = {text: encode_prompt(model.text_encoders, text).context[0] for text in (CAT, DOG)}
    assert len(calls) == len(expected_texts)
    for call, ((context, _), text) in enumerate(zip(calls, expected_texts, strict=True)):
        other = DOG if text == CAT else CAT
        assert torch.allclose(context, encoded[text], atol=1e-5), f"call {call} should see {text!r}"
        assert not torch.allclose(context, encoded[other], atol=1e-3), f"call {call} saw {other!r}"
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def _texts_by_step(prompt, steps_per_call):
    schedule = get_prompt_schedule(prompt, STEPS)
    return [next(text for end, text in schedule if step <= end) for step in steps_per_call]


def test_other_step_rules_would_fail_these_tests():
    """Two rules a second-order run could plausibly follow instead, each caught by one of the prompts: both calls
    of step i use step i (a sampler-step rule), or the second call uses i + 1 (difusi's old rule, whose counter
    the progress callback advanced between a step's two calls)."""
    per_step = [i for i in range(STEPS - 1) for _ in range(2)] + [STEPS - 1]
    callback_advanced = [0] + [i for i in range(1, STEPS) for _ in range(2)]
    for steps_per_call in (per_step, callback_advanced):
        assert any(SECOND_ORDER[kind] != _texts_by_step(prompt, steps_per_call) for kind, prompt in PROMPTS.items())
    assert _texts_by_step(PROMPTS["edit"], callback_advanced) != SECOND_ORDER["edit"]
    assert _texts_by_step(PROMPTS["alternate"], per_step) != SECOND_ORDER["alternate"]


def test_ngms_skips_the_uncond_pass_on_odd_model_calls_of_a_second_order_sampler(tiny_models, monkeypatch):
    """A1111's NGMS parity is `CFGDenoiser.step % 2`, a call count: Heun skips on each step's second call."""
    model = tiny_models("sd1")
    _, calls, _ = _pipeline(model, monkeypatch, "Heun", "a cat", steps=3, s_min_uncond=100.0)
    assert [batch for _, batch in calls] == [2, 1, 2, 1, 2]


# ----------------------------------------------------------------------------- the rule, unit by unit


def test_schedule_length_is_a1111_total_steps():
    for sampler in list_samplers():
        factor = 2 if sampler.name in A1111_SECOND_ORDER else 1
        assert _schedule_steps(sampler, 7) == 7 * factor, sampler.name


def _schedule(*ends):
    return [(end, Conditioning(torch.full((1, 77, 4), float(index)))) for index, end in enumerate(ends)]


def test_each_model_call_takes_the_next_schedule_step_whatever_its_sigma():
    """Call k uses step k: sigmas given as 0-dim or [B] tensors, repeated (Heun's corrector and the next step's
    first call share sigma_{i+1}) or rising (Restart) do not change it; there is no progress callback at all."""
    seen = []

    def denoiser(x, sigma, context):
        seen.append(float(context[0, 0, 0]))
        return x

    cond, uncond = _schedule(1, 3, 6), _schedule(6)
    run = SimpleNamespace(cond=cond, uncond=uncond, size=(64, 64), original_size=(64, 64))
    guided = _ScheduledCFG(denoiser, run, SimpleNamespace(cfg_scale=1.0, s_min_uncond=0.0), 2,
                           SimpleNamespace(family="sd1"))
    x = torch.zeros(2, 4, 8, 8)
    for sigma in [14.6, 3.0, 3.0, 0.5, torch.tensor(0.5), 2.0, 0.1, 0.1, 0.05]:
        guided(x, torch.as_tensor(sigma).expand(2) if isinstance(sigma, float) else sigma)
    # steps 0,1 -> entry 0; 2,3 -> entry 1; 4..6 -> entry 2; past the last end step (7, 8) -> entry 0 (A1111)
    assert seen == [0, 0, 1, 1, 2, 2, 2, 0, 0]
    assert guided.calls == 9


def test_conditioning_past_the_schedule_end_is_the_first_entry_as_in_a1111():
    schedule = _schedule(2, 4)
    picked = [conditioning_at(schedule, step) for step in range(7)]
    assert [p is schedule[0][1] for p in picked] == [True, True, True, False, False, True, True]
