"""Bench: seconds per image for difusi vs. diffusers' StableDiffusionPipeline on the same weights, side by side.

    python bench/txt2img_speed.py [--model PATH] [--steps 20] [--repeats 5]

Both run 20 steps of DPM++ 2M with Karras sigmas and CFG 7 at the model's native size on the CPU, from
the same modules (difusi's loaded UNet/VAE/text encoder), so the ratio measures the pipeline overhead
and the sampler implementation, not different weights. Default model: difusi-mini (target: < 1 s/image).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DPMSolverMultistepScheduler

import difusi  # noqa: F401  (offline env before Hugging Face imports)
from difusi.api import get_model
from difusi.params import GenerationParams
from difusi.pipeline import txt2img


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = get_model(args.model)
    size = model.native_size
    prompt = "a red circle on a blue background"
    params = GenerationParams(prompt=prompt, seed=1, steps=args.steps, cfg_scale=7.0, sampler_name="DPM++ 2M",
                              scheduler="Karras", width=size, height=size)
    ours = _time(lambda: txt2img(model, params), args.repeats)

    from difusi.models.synthetic import reference_pipeline_for

    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            use_karras_sigmas=True, prediction_type=model.prediction_type)
    reference = reference_pipeline_for(model, scheduler)  # diffusers' own classes with the same weights
    generator = torch.Generator("cpu")

    def run_reference():
        with torch.inference_mode():
            reference(prompt, num_inference_steps=args.steps, guidance_scale=7.0, height=size, width=size,
                      generator=generator.manual_seed(1), output_type="pil")

    theirs = _time(run_reference, args.repeats)
    print(f"model: {model.name} ({model.family}, {size}x{size}), {args.steps} steps DPM++ 2M Karras, CFG 7, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"difusi    : {ours:.3f} s/image")
    print(f"diffusers : {theirs:.3f} s/image")
    print(f"ratio difusi/diffusers: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
