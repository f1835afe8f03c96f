"""Evaluate the pink LoRA: ``python -m difusi.mini evaluate-lora PATH [--prompts N --seeds S --out CARD.json]``.

Images come from difusi's own pipeline (``difusi.pipeline.txt2img``, DPM++ 2M Karras, 20 steps, CFG 7, the
reference of ``difusi.mini.evaluate``) with the LoRA merged into the loaded model's weights by
``difusi.mini.lora.merged`` (``W += m * (alpha/rank) * up @ down``, kohya's/A1111's rule, restored afterwards).

Measured:

* **pink adherence** at multipliers 0 (the base model), 0.5 and 1: the fraction of images of prompts such as
  "a big pink circle on the left on a blue background" whose shape reads as pink. Colours are read as in
  ``difusi.mini.classifier`` (nearest palette colour to the shape's median pixel) but over the base palette
  *plus* pink, so the base model's nearest guesses (orange, purple, red, ...) count as misses; the same
  prompts' four-attribute "overall" (shape colour, background, position, shape) is reported too;
* **old vocabulary**: ``difusi.mini.evaluate``'s overall adherence on its prompt set, without and with the
  LoRA at multiplier 1 (the LoRA should leave it where it was).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import difusi  # noqa: F401  (offline hub settings first)
from difusi.errors import ParamError
from difusi.mini import classifier, data, evaluate
from difusi.mini import lora as mini_lora

EXTENDED_COLOURS: dict[str, tuple[int, int, int]] = {**data.COLOURS, **data.EXTRA_COLOURS}
_NAMES = tuple(EXTENDED_COLOURS)
_PALETTE = np.array([EXTENDED_COLOURS[name] for name in _NAMES], dtype=np.float32)
MULTIPLIERS = (0.0, 0.5, 1.0)


@dataclass
class LoraEvaluation:
    """The numbers of one evaluation (fractions in [0, 1]; ``old_delta_points`` in percentage points)."""

    lora: str
    pink_prompts: int
    pink_seeds: int
    pink_base: float  # multiplier 0: the base model's pink shapes (expected ~0)
    pink_half: float  # multiplier 0.5
    pink_full: float  # multiplier 1
    pink_overall_base: float  # four-attribute adherence on the pink prompts
    pink_overall_half: float
    pink_overall_full: float
    old_prompts: int
    old_seeds: int
    old_overall_base: float  # difusi.mini.evaluate's overall adherence without the LoRA
    old_overall_lora: float  # ... with it at multiplier 1
    old_delta_points: float  # 100 * (lora - base)
    pink_colours_seen: dict  # multiplier -> {colour name: images}
    seconds: float


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the colour of the base palette plus pink nearest (Euclidean RGB) to ``rgb``."""
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def observe(image: np.ndarray, shape_model) -> classifier.Observation:
    """``classifier.observe`` with background and shape colours read over the extended palette."""
    seen = classifier.observe(image, shape_model)
    _, background_rgb = classifier.background_colour(image)
    mask = classifier.shape_pixels(image, background_rgb)
    colour = None
    if mask.sum() >= classifier.MIN_FOREGROUND_PIXELS:
        colour = nearest_colour(np.median(image[classifier._core(mask)].astype(np.float32), axis=0))
    return dataclasses.replace(seen, background=nearest_colour(background_rgb), colour=colour)


def pink_prompts(count: int, seed: int = 2025) -> list[evaluate.PromptSpec]:
    """``count`` full single-shape pink prompts; shape, position and size cycle, backgrounds are drawn."""
    rng = random.Random(seed)
    return [
        evaluate.PromptSpec(
            colour=mini_lora.NEW_COLOUR,
            shape=data.SHAPES[i % len(data.SHAPES)],
            position=data.POSITIONS[i % len(data.POSITIONS)],
            background=rng.choice(data.COLOUR_NAMES),
            size=data.SIZES[(i // len(data.SHAPES)) % len(data.SIZES)],
        )
        for i in range(count)
    ]


def pipeline_generator(model):
    """(prompt, seed, count) -> images, through ``txt2img`` at the evaluation's reference settings."""
    from difusi.params import GenerationParams
    from difusi.pipeline import txt2img

    ref = evaluate.REFERENCE

    def generate(prompt: str, seed: int, count: int) -> list[np.ndarray]:
        params = GenerationParams(
            prompt=prompt, negative_prompt="", seed=seed, batch_size=count, cfg_scale=ref["cfg"],
            sampler_name=ref["sampler"], scheduler=ref["scheduler"], steps=ref["steps"],
        ).validated(model.native_size)
        return [np.asarray(image.image.convert("RGB")) for image in txt2img(model, params).images]

    return generate


def _pink_rates(generate, prompts, seeds: int, shape_model, first_seed: int) -> tuple[float, float, dict]:
    """(pink shape rate, four-attribute overall, colours seen) over prompts x seeds."""
    pink, tally, colours = 0, evaluate.Tally(), {}
    for spec in prompts:
        for image in generate(spec.text, first_seed, seeds):
            seen = observe(image, shape_model)
            pink += seen.colour == mini_lora.NEW_COLOUR
            colours[seen.colour or "none"] = colours.get(seen.colour or "none", 0) + 1
            tally.add(evaluate.score(spec, seen))
    images = max(1, tally.images)
    return pink / images, tally.summary()["overall"], dict(sorted(colours.items(), key=lambda kv: -kv[1]))


def _old_overall(generate, prompts, seeds: int, shape_model, first_seed: int) -> float:
    tally = evaluate.Tally()
    for spec in prompts:
        for image in generate(spec.text, first_seed, seeds):
            tally.add(evaluate.score(spec, classifier.observe(image, shape_model)))
    return tally.summary()["overall"]


def evaluate_lora(path: str | Path, model=None, prompts: int = 12, seeds: int = 4, old_prompts: int = 24,
                  old_seeds: int = 2, first_seed: int = 1000, progress=print) -> LoraEvaluation:
    """Every number of the module docstring for the LoRA file ``path`` (the model is restored afterwards)."""
    started = time.time()
    model = model if model is not None else mini_lora.load_base_model()
    tensors = mini_lora.read_kohya(path)[0]
    generate = pipeline_generator(model)
    shape_model = classifier.train_shape_classifier()
    pinks = pink_prompts(prompts)
    old = evaluate.prompt_set(old_prompts)
    rates, overall, colours = {}, {}, {}
    for multiplier in MULTIPLIERS:
        with mini_lora.merged(model, tensors, multiplier):
            rates[multiplier], overall[multiplier], colours[f"{multiplier:g}"] = _pink_rates(
                generate, pinks, seeds, shape_model, first_seed
            )
        progress(f"multiplier {multiplier:g}: pink {100 * rates[multiplier]:.1f} %, colours {colours[f'{multiplier:g}']}")
    old_base = _old_overall(generate, old, old_seeds, shape_model, first_seed)
    with mini_lora.merged(model, tensors, 1.0):
        old_lora = _old_overall(generate, old, old_seeds, shape_model, first_seed)
    progress(f"old vocabulary: {100 * old_base:.1f} % without, {100 * old_lora:.1f} % with the LoRA")
    return LoraEvaluation(
        lora=Path(path).name, pink_prompts=prompts, pink_seeds=seeds,
        pink_base=rates[0.0], pink_half=rates[0.5], pink_full=rates[1.0],
        pink_overall_base=overall[0.0], pink_overall_half=overall[0.5], pink_overall_full=overall[1.0],
        old_prompts=old_prompts, old_seeds=old_seeds, old_overall_base=old_base, old_overall_lora=old_lora,
        old_delta_points=round(100 * (old_lora - old_base), 4), pink_colours_seen=colours,
        seconds=round(time.time() - started, 1),
    )


def summary_markdown(result: LoraEvaluation) -> str:
    """The numbers as a short markdown table."""
    def pc(value: float) -> str:
        return f"{100 * value:.1f}"

    return "\n".join([
        f"LoRA `{result.lora}`: {result.pink_prompts} pink prompts x {result.pink_seeds} seeds; "
        f"old vocabulary {result.old_prompts} prompts x {result.old_seeds} seeds (DPM++ 2M Karras, 20 steps, CFG 7).",
        "",
        "| | pink shape % | pink prompts overall % |",
        "|---|---|---|",
        f"| base (multiplier 0) | {pc(result.pink_base)} | {pc(result.pink_overall_base)} |",
        f"| multiplier 0.5 | {pc(result.pink_half)} | {pc(result.pink_overall_half)} |",
        f"| multiplier 1 | {pc(result.pink_full)} | {pc(result.pink_overall_full)} |",
        "",
        f"Old vocabulary overall: {pc(result.old_overall_base)} % without, {pc(result.old_overall_lora)} % with the "
        f"LoRA ({result.old_delta_points:+.1f} points). {result.seconds:.0f} s.",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difusi mini evaluate-lora", description="Score the pink LoRA.")
    parser.add_argument("lora", type=Path, metavar="PATH", help="the kohya LoRA .safetensors")
    parser.add_argument("--prompts", type=int, default=12, help="pink prompts (default 12)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per pink prompt (default 4)")
    parser.add_argument("--old-prompts", type=int, default=24, help="old-vocabulary prompts (default 24)")
    parser.add_argument("--old-seeds", type=int, default=2, help="seeds per old-vocabulary prompt (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m difusi.mini evaluate-lora`` (and ``difusi mini evaluate-lora``)."""
    import torch

    args = parse_args(argv)
    for name in ("prompts", "seeds", "old_prompts", "old_seeds"):
        if getattr(args, name) < 1:
            raise ParamError(name, f"must be at least 1, got {getattr(args, name)}")
    if not args.lora.is_file():
        raise ParamError("lora", f"no such file: {args.lora}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_lora(args.lora, prompts=args.prompts, seeds=args.seeds, old_prompts=args.old_prompts,
                           old_seeds=args.old_seeds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(summary_markdown(result))
    return 0
