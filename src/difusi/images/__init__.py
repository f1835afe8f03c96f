"""Pictures a job starts from: reading them safely, A1111's resize modes, masks, outpainting canvases.

- `load`: untrusted bytes / paths -> PIL images, with decompression-bomb and pixel-budget checks.
- `resize`: A1111's `resize_image` (just resize, crop and resize, resize and fill) and `flatten`.
- `masks`: A1111's inpainting mask rules (binary mask, Gaussian blur, "only masked" crop box, fill, overlay).
- `outpaint`: A1111's "Poor man's outpainting" canvas and masks.
"""
