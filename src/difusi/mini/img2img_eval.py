"""img2img and inpainting on difusi-mini, end to end: ``python -m difusi.mini evaluate-img2img [--cases N ...]``.

Every image comes from difusi's own pipeline (``difusi.pipeline.txt2img`` / ``img2img``, DPM++ 2M Karras, 20 steps,
CFG 7: the reference of ``difusi.mini.evaluate``) and is scored by ``difusi.mini.classifier`` on the whole 64-px
output, as that evaluation scores txt2img (its border is read as the background, so masks stay off the border).

Measured:

* **inpaint**: a plain background picture (a palette colour, exact RGB) and a square mask where a shape of the
  data set would stand (one of the five named positions, side ``2 * MASK_HALF`` px); prompt "a big red circle <at
  the position> on a <background> background". A case is a *hit* when the classifier sees a red circle whose
  centroid lies inside the mask. The outside is checked exactly: every pixel where the blurred mask
  (``difusi.images.masks.gaussian_blur`` of the mask by ``mask_blur``, A1111's 8-bit Gaussian) is 0 must equal
  the input picture's pixel. Reported per masked-content mode (1 original, 2 latent noise, ...);
* **colour change**: txt2img images of single-shape prompts ("a red circle on a blue background" first, then
  ``difusi.mini.evaluate.prompt_set``'s full prompts) that the scorer reads correctly are redrawn by img2img at
  strength 0.6, same seed, with the colour word changed. A hit takes the new colour and keeps the position: the
  centroid of the shape's pixels (``classifier.shape_pixels``) moves less than ``MAX_SHIFT`` px;
* **strength near 0**: img2img at strength 0 must equal ``decode(encode(picture))`` (the VAE round trip) exactly;
  at 0.05 (A1111's step rule: 2 of 20 steps at the lowest sigmas) the max / mean absolute difference from the
  round trip is reported, next to the round trip's own error against the picture.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import difusi  # noqa: F401  (offline hub settings first)
from difusi.errors import ParamError
from difusi.mini import classifier, data, evaluate

MASK_HALF = 15
"""Half the side of the square inpaint mask, px (a big shape's half-extent is 0.19 * 64 ~ 12 px, +-10 %)."""
MAX_SHIFT = 4.0
"""Colour change: the largest centroid move (px, of 64) that still counts as the same position."""
INPAINT_BACKGROUNDS = ("blue", "white", "green", "yellow", "black", "purple")
"""Plain backgrounds for the red circle (not red, and not orange: too near red for a clean silhouette)."""
TARGET_COLOURS = {"red": "green", "green": "yellow", "blue": "red", "yellow": "purple", "white": "red",
                  "black": "white", "orange": "blue", "purple": "orange"}
"""Colour change: the new colour word for each old one (fixed, so runs are comparable)."""


@dataclass(frozen=True)
class Settings:
    """Sampling settings of one measurement (defaults: ``difusi.mini.evaluate.REFERENCE``)."""

    steps: int = evaluate.REFERENCE["steps"]
    cfg: float = evaluate.REFERENCE["cfg"]
    sampler: str = evaluate.REFERENCE["sampler"]
    scheduler: str = evaluate.REFERENCE["scheduler"]

    def params(self, **changes):
        from difusi.params import GenerationParams

        return GenerationParams(negative_prompt="", cfg_scale=self.cfg, sampler_name=self.sampler,
                                scheduler=self.scheduler, steps=self.steps, width=64, height=64, **changes)


@dataclass(frozen=True)
class InpaintCase:
    background: str
    position: str
    plain: bool = False
    """Prompt without size and position words ("a red circle on a blue background"): only the mask says where."""

    @property
    def prompt(self) -> str:
        if self.plain:
            return f"a red circle on a {self.background} background"
        return f"a big red circle {data.POSITION_PHRASES[self.position][0]} on a {self.background} background"

    def box(self, size: int = 64) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), exclusive ends: the mask square centred on the position's centre."""
        fx, fy = data.POSITION_CENTRES[self.position]
        cx, cy = int(round(fx * size)), int(round(fy * size))
        return cx - MASK_HALF, cy - MASK_HALF, cx + MASK_HALF, cy + MASK_HALF

    def picture(self, size: int = 64) -> Image.Image:
        return Image.new("RGB", (size, size), data.COLOURS[self.background])

    def mask(self, size: int = 64) -> Image.Image:
        array = np.zeros((size, size), dtype=np.uint8)
        x0, y0, x1, y1 = self.box(size)
        array[y0:y1, x0:x1] = 255
        return Image.fromarray(array, mode="L")


def inpaint_cases(count: int, plain: bool = False) -> list[InpaintCase]:
    """``count`` cases; backgrounds and positions cycle independently (6 x 5 = 30 distinct pairs)."""
    return [InpaintCase(INPAINT_BACKGROUNDS[i % len(INPAINT_BACKGROUNDS)], data.POSITIONS[i % len(data.POSITIONS)],
                        plain) for i in range(count)]


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) centre of a boolean mask's pixels, None when it has fewer than the classifier's minimum."""
    if mask.sum() < classifier.MIN_FOREGROUND_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def shape_centroid(image: np.ndarray) -> tuple[float, float] | None:
    """Centroid of the main shape's pixels as the classifier finds them."""
    _, background_rgb = classifier.background_colour(image)
    return centroid(classifier.shape_pixels(image, background_rgb))


def outside_mask(mask: Image.Image, blur: int) -> np.ndarray:
    """Boolean (H, W): where the blurred mask is 0, i.e. where A1111's overlay keeps the original exactly."""
    blurred = blurred_mask(mask, blur)
    return np.asarray(blurred) == 0


def blurred_mask(mask: Image.Image, blur: int) -> Image.Image:
    """The mask blurred as the pipeline blurs it (A1111's 8-bit Gaussian, x and y)."""
    from difusi.images.masks import gaussian_blur

    return gaussian_blur(mask, blur, blur) if blur else mask


@dataclass
class InpaintResult:
    prompt: str
    """"full" ("a big red circle at the top on a blue background") or "plain" (no size or position words)."""
    fill: int
    strength: float
    mask_blur: int
    cases: int
    seeds: int
    hits: int
    red: int
    circle: int
    inside: int
    outside_exact: int
    """Images whose every pixel outside the blurred mask equals the input's."""
    outside_pixels_checked: int
    misses: dict = field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.cases * self.seeds

    @property
    def rate(self) -> float:
        return self.hits / max(1, self.images)


def run_inpaint(model, cases: list[InpaintCase], seeds: int, fill: int, strength: float = 1.0, mask_blur: int = 4,
                settings: Settings = Settings(), shape_model=None, first_seed: int = 1000,
                keep: list | None = None) -> InpaintResult:
    """Inpaint every case with ``seeds`` seeds (one batch per case) and score it (module docstring)."""
    from difusi.pipeline import img2img

    shape_model = shape_model if shape_model is not None else classifier.train_shape_classifier()
    style = "plain" if cases and cases[0].plain else "full"
    result = InpaintResult(style, fill, strength, mask_blur, len(cases), seeds, 0, 0, 0, 0, 0, 0)
    for case in cases:
        picture, mask = case.picture(), case.mask()
        outside = outside_mask(mask, mask_blur)
        original = np.asarray(picture)
        params = settings.params(prompt=case.prompt, seed=first_seed, batch_size=seeds, denoising_strength=strength,
                                 inpainting_fill=fill, mask_blur=mask_blur)
        x0, y0, x1, y1 = case.box()
        for image in img2img(model, params, [picture], mask).images:
            pixels = np.asarray(image.image.convert("RGB"))
            result.outside_pixels_checked += int(outside.sum())
            result.outside_exact += bool((pixels[outside] == original[outside]).all())
            seen = classifier.observe(pixels, shape_model)
            where = shape_centroid(pixels)
            inside = where is not None and x0 <= where[0] < x1 and y0 <= where[1] < y1
            red, circle = seen.colour == "red", seen.shape == "circle"
            result.red += red
            result.circle += circle
            result.inside += inside
            result.hits += red and circle and inside
            if not (red and circle and inside):
                key = f"{seen.colour or 'none'} {seen.shape or 'none'}" + ("" if inside else " outside the mask")
                result.misses[key] = result.misses.get(key, 0) + 1
            if keep is not None and len(keep) < 16:
                keep.append(pixels)
    return result


@dataclass
class ColourChangeResult:
    strength: float
    sources: int
    """Source images the scorer read correctly (only these are redrawn)."""
    generated: int
    """Source images generated (sources / generated is the txt2img adherence of these prompts)."""
    hits: int
    new_colour: int
    kept_position: int
    same_place: int = 0
    """Redrawn images whose classifier position name (nearest of the five named centres) is the source's."""
    hits_by_name: int = 0
    """New colour and the same position name (the looser reading of "keeps the position")."""
    shifts: list = field(default_factory=list)
    """Centroid move of every redrawn image, px."""
    misses: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.hits / max(1, self.sources)


def colour_change_prompts(count: int) -> list[tuple[evaluate.PromptSpec, evaluate.PromptSpec]]:
    """(source, target) prompt pairs: "a red circle on a blue background" -> green first, then the evaluation's
    prompt set with the colour word changed by ``TARGET_COLOURS`` (a target equal to the background is skipped)."""
    pairs = []
    for spec in evaluate.prompt_set(4 * count + 8):
        if len(pairs) == count:
            break
        target = TARGET_COLOURS[spec.colour]
        if target == spec.background:
            continue
        pairs.append((spec, evaluate.PromptSpec(target, spec.shape, spec.position, spec.background, spec.size)))
    return pairs


def _plain_text(spec: evaluate.PromptSpec, plain: bool) -> str:
    return f"a {spec.colour} {spec.shape} on a {spec.background} background" if plain else spec.text


def run_colour_change(model, pairs, seeds: int, strength: float = 0.6, settings: Settings = Settings(),
                      shape_model=None, first_seed: int = 1000, plain_first: bool = True,
                      keep: list | None = None) -> ColourChangeResult:
    """txt2img the sources (``seeds`` per prompt), keep the correctly scored ones, img2img them with the target
    prompt at ``strength`` (same seed) and score (module docstring). With ``plain_first`` the first pair is the
    brief's "a red circle on a blue background" -> "a green circle ..." (no size or position words)."""
    from difusi.pipeline import img2img, txt2img

    shape_model = shape_model if shape_model is not None else classifier.train_shape_classifier()
    result = ColourChangeResult(strength, 0, 0, 0, 0, 0)
    for index, (source, target) in enumerate(pairs):
        plain = plain_first and index == 0
        made = txt2img(model, settings.params(prompt=_plain_text(source, plain), seed=first_seed, batch_size=seeds))
        for image in made.images:
            pixels = np.asarray(image.image.convert("RGB"))
            result.generated += 1
            seen = classifier.observe(pixels, shape_model)
            wanted = evaluate.score(source, seen)
            if plain:
                wanted = {k: wanted[k] for k in ("colour", "background", "shape")}
            if not all(wanted.values()):
                continue
            result.sources += 1
            params = settings.params(prompt=_plain_text(target, plain), seed=image.seed, denoising_strength=strength)
            redrawn = np.asarray(img2img(model, params, [image.image]).images[0].image.convert("RGB"))
            before, after = shape_centroid(pixels), shape_centroid(redrawn)
            shift = float("inf") if after is None else float(np.hypot(after[0] - before[0], after[1] - before[1]))
            result.shifts.append(round(shift, 2))
            after_seen = classifier.observe(redrawn, None)
            colour = after_seen.colour
            new, kept = colour == target.colour, shift < MAX_SHIFT
            result.new_colour += new
            result.kept_position += kept
            result.hits += new and kept
            same_place = after_seen.position == seen.position
            result.same_place += same_place
            result.hits_by_name += new and same_place
            if not (new and kept):
                key = f"{source.colour}->{target.colour}: saw {colour or 'none'}" + ("" if kept else f", moved {shift:.1f} px")
                result.misses[key] = result.misses.get(key, 0) + 1
            if keep is not None and len(keep) < 16:
                keep.extend([pixels, redrawn])
    return result


@dataclass
class NearZeroResult:
    kind: str
    """"scene" (a picture of the training distribution) or "plain" (one palette colour, no shape)."""
    pictures: int
    roundtrip_max: float
    """decode(encode(picture)) vs the picture: the VAE's own error (0-255 levels), max over pictures."""
    roundtrip_mean: float
    zero_equal: int
    """Pictures whose strength-0 output equals the round trip exactly."""
    low_strength: float
    low_max: float
    """Strength ``low_strength`` output vs the round trip: max and mean absolute difference (0-255 levels)."""
    low_mean: float


def run_near_zero(model, pictures: dict[str, list[Image.Image]], settings: Settings = Settings(), low: float = 0.05,
                  first_seed: int = 1000) -> list[NearZeroResult]:
    """Strength 0 and ``low`` against the VAE round trip of each picture, one result per kind (module docstring)."""
    import torch

    from difusi.pipeline import img2img
    from difusi.vae import decode_latents, encode_images, latents_to_pil, pil_to_tensor

    results = []
    for kind, group in pictures.items():
        rt_max, rt_means, zero_equal, low_max, low_means = 0.0, [], 0, 0.0, []
        for index, picture in enumerate(group):
            with torch.inference_mode():
                latents = encode_images(model.vae, pil_to_tensor([picture]), model.scaling_factor)
                decoded = decode_latents(model.vae, latents, model.scaling_factor)
            roundtrip = np.asarray(latents_to_pil(decoded)[0], dtype=np.int16)
            error = np.abs(roundtrip - np.asarray(picture.convert("RGB"), dtype=np.int16))
            rt_max, rt_means = max(rt_max, float(error.max())), [*rt_means, float(error.mean())]
            outputs = {}
            for strength in (0.0, low):
                params = settings.params(prompt="", seed=first_seed + index, denoising_strength=strength)
                outputs[strength] = np.asarray(img2img(model, params, [picture]).images[0].image, dtype=np.int16)
            zero_equal += bool((outputs[0.0] == roundtrip).all())
            diff = np.abs(outputs[low] - roundtrip)
            low_max, low_means = max(low_max, float(diff.max())), [*low_means, float(diff.mean())]
        results.append(NearZeroResult(kind, len(group), rt_max, round(float(np.mean(rt_means)), 3), zero_equal, low,
                                      low_max, round(float(np.mean(low_means)), 3)))
    return results


def near_zero_pictures(count: int, seed: int = 77) -> dict[str, list[Image.Image]]:
    """``count`` pictures of the training distribution (``difusi.mini.data``) and ``count`` plain backgrounds."""
    return {
        "scene": [Image.fromarray(data.make_sample(seed, i).image) for i in range(count)],
        "plain": [Image.new("RGB", (64, 64), data.COLOURS[data.COLOUR_NAMES[i % len(data.COLOUR_NAMES)]])
                  for i in range(count)],
    }


def _pc(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / max(1, whole):.1f} %)"


def summary_markdown(results: dict) -> str:
    """The numbers as markdown (what ``--out`` writes next to the JSON)."""
    s = results["settings"]
    lines = [
        "# difusi-mini img2img / inpainting evaluation",
        "",
        f"`{results['model']}`, {s['sampler']} {s['scheduler']}, {s['steps']} steps, CFG {s['cfg']:g}; scored by "
        "`difusi.mini.classifier` on the whole 64-px output. Module: `difusi.mini.img2img_eval`.",
        "",
        f"## Inpaint \"a big red circle <position> on a <background> background\" into a {2 * MASK_HALF}-px square mask",
        "",
        "| prompt | masked content | strength | mask blur | hit (red circle inside the mask) | red | circle "
        "| centroid in mask | outside untouched (exact) | common misses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {0: "0 fill", 1: "1 original", 2: "2 latent noise", 3: "3 latent nothing"}
    for r in results["inpaint"]:
        n = r["cases"] * r["seeds"]
        misses = ", ".join(f"{k} ({v})" for k, v in sorted(r["misses"].items(), key=lambda kv: -kv[1])[:4]) or "none"
        lines.append(f"| {r['prompt']} | {names[r['fill']]} | {r['strength']:g} | {r['mask_blur']} | {_pc(r['hits'], n)} | "
                     f"{_pc(r['red'], n)} | {_pc(r['circle'], n)} | {_pc(r['inside'], n)} | "
                     f"{_pc(r['outside_exact'], n)} | {misses} |")
    lines += ["", f"{results['inpaint'][0]['cases']} cases (backgrounds {', '.join(INPAINT_BACKGROUNDS)} x the five "
              f"positions) x {results['inpaint'][0]['seeds']} seeds per row. Prompt full: \"a big red circle <at the "
              "mask's position> on a <background> background\"; plain: \"a red circle on a <background> background\" "
              "(only the mask says where).", ""]
    lines += ["## Colour change by img2img (same seed, colour word changed)", "",
              f"| strength | sources (scored correct / generated) | hit (new colour, moved < {MAX_SHIFT:g} px) "
              "| new colour | moved < 4 px | same position name | hit by name (new colour, same name) "
              "| centroid move median / max px | common misses |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["colour_change"]:
        shifts = [x for x in r["shifts"] if np.isfinite(x)]
        misses = ", ".join(f"{k} ({v})" for k, v in sorted(r["misses"].items(), key=lambda kv: -kv[1])[:4]) or "none"
        move = f"{np.median(shifts):.2f} / {max(shifts):.2f}" if shifts else "-"
        lines.append(f"| {r['strength']:g} | {r['sources']}/{r['generated']} | {_pc(r['hits'], r['sources'])} | "
                     f"{_pc(r['new_colour'], r['sources'])} | {_pc(r['kept_position'], r['sources'])} | "
                     f"{_pc(r['same_place'], r['sources'])} | {_pc(r['hits_by_name'], r['sources'])} | {move} | "
                     f"{misses} |")
    lines += ["", "## Strength near 0 (compared with the VAE round trip decode(encode(picture)))", "",
              "| pictures | round trip vs picture: max / mean levels | strength 0 == round trip | "
              "strength 0.05 vs round trip: max / mean levels |", "|---|---|---|---|"]
    for z in results["near_zero"]:
        lines.append(f"| {z['pictures']} {z['kind']} | {z['roundtrip_max']:.0f} / {z['roundtrip_mean']:.2f} | "
                     f"{_pc(z['zero_equal'], z['pictures'])} exactly | {z['low_max']:.0f} / {z['low_mean']:.2f} |")
    lines += ["", "Scenes: pictures of the training distribution (`difusi.mini.data`); plain: one palette colour, "
              "no shape.", "", f"{results['seconds']:.0f} s in all.", ""]
    return "\n".join(lines)


def run_evaluation(model, cases: int = 30, inpaint_seeds: int = 2, fills=(1, 2), strength: float = 1.0,
                   mask_blur: int = 4, pairs: int = 12, pair_seeds: int = 4, change_strengths=(0.6,),
                   near_zero: int = 6, settings: Settings = Settings(), plain: bool = True, progress=print) -> dict:
    """Every table of the report as one JSON-ready dict; ``plain``: the inpaint rows again with plain prompts."""
    started = time.time()
    shape_model = classifier.train_shape_classifier()
    results: dict = {"settings": asdict(settings), "inpaint": [], "colour_change": []}
    for style in (False, True) if plain else (False,):
        for fill in fills:
            r = run_inpaint(model, inpaint_cases(cases, style), inpaint_seeds, fill, strength, mask_blur, settings,
                            shape_model)
            results["inpaint"].append({**asdict(r), "rate": r.rate})
            progress(f"inpaint {r.prompt} prompt, fill {fill}: {_pc(r.hits, r.images)} hits, "
                     f"outside exact {_pc(r.outside_exact, r.images)}")
    for change in change_strengths:
        r = run_colour_change(model, colour_change_prompts(pairs), pair_seeds, change, settings, shape_model)
        results["colour_change"].append({**asdict(r), "rate": r.rate})
        progress(f"colour change {change:g}: {_pc(r.hits, r.sources)} hits, {_pc(r.hits_by_name, r.sources)} by name")
    results["near_zero"] = [asdict(z) for z in run_near_zero(model, near_zero_pictures(near_zero), settings)]
    progress(f"near zero: {results['near_zero']}")
    results["seconds"] = round(time.time() - started, 1)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difusi mini evaluate-img2img",
                                     description="Score difusi-mini's img2img and inpainting.")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped difusi-mini)")
    parser.add_argument("--cases", type=int, default=30, help="inpaint cases (default 30)")
    parser.add_argument("--inpaint-seeds", type=int, default=2, help="seeds per inpaint case (default 2)")
    parser.add_argument("--fills", default="1,2", help="masked-content modes to measure, e.g. 1,2 (default)")
    parser.add_argument("--strength", type=float, default=1.0, help="inpaint denoising strength (default 1)")
    parser.add_argument("--mask-blur", type=int, default=4, help="inpaint mask blur (default 4)")
    parser.add_argument("--pairs", type=int, default=12, help="colour-change prompt pairs (default 12)")
    parser.add_argument("--pair-seeds", type=int, default=4, help="seeds per colour-change prompt (default 4)")
    parser.add_argument("--change-strengths", default="0.6", help="colour-change strengths (default 0.6)")
    parser.add_argument("--near-zero", type=int, default=6, help="pictures of each kind for the strength-0 check (default 6)")
    parser.add_argument("--no-plain", action="store_true", help="skip the inpaint rows with plain prompts")
    parser.add_argument("--steps", type=int, default=evaluate.REFERENCE["steps"])
    parser.add_argument("--cfg", type=float, default=evaluate.REFERENCE["cfg"])
    parser.add_argument("--out", type=Path, default=None, help="write img2img.json and img2img.md to this folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m difusi.mini evaluate-img2img`` (and ``difusi mini evaluate-img2img``)."""
    import torch

    from difusi.models.loader import default_model_path, load_model

    args = parse_args(argv)
    for name in ("cases", "inpaint_seeds", "pairs", "pair_seeds", "steps"):
        if getattr(args, name) < 1:
            raise ParamError(name, f"must be at least 1, got {getattr(args, name)}")
    fills = evaluate.number_list(args.fills, "fills", int)
    if not fills or any(f not in (0, 1, 2, 3) for f in fills):
        raise ParamError("fills", f"masked-content modes are 0-3, got {args.fills!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model or default_model_path())
    settings = Settings(steps=args.steps, cfg=args.cfg)
    results = run_evaluation(model, args.cases, args.inpaint_seeds, fills, args.strength, args.mask_blur, args.pairs,
                             args.pair_seeds, evaluate.number_list(args.change_strengths, "change_strengths"), args.near_zero, settings,
                             plain=not args.no_plain)
    results["model"] = str(args.model or default_model_path().name)
    text = summary_markdown(results)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "img2img.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "img2img.md").write_text(text)
    print(text)
    return 0


__all__ = ["InpaintCase", "inpaint_cases", "run_inpaint", "run_colour_change", "run_near_zero", "run_evaluation",
           "main"]
