"""Synthetic RGB "dermoscopy-like" pictures with image-level labels (no real dermoscopy set exists here).

They exist so the weakly supervised path runs end to end on 2D RGB input: skin-toned background
with smooth shading and fine grain, sometimes a few dark hairs (either class), and for a lesion
picture a brown, darker-centred, lobulated blob with a soft edge. They are NOT a model of real
dermoscopy and say nothing about accuracy on real skin lesions.

Everything is seeded numpy/scipy: the same arguments give the same bytes. Arrays are (H, W[, 3]).
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from DiffusionSegLib.core.errors import DatasetError
from DiffusionSegLib.core.files import replace_folder

WIDTH_FRACTION = (0.15, 0.45)  # lesion mask bounding-box width / image width
_DRAWN_FRACTION = (0.17, 0.43)  # drawn inside WIDTH_FRACTION: the pixel grid moves the extent by ~1 px
HAIR_PROBABILITY = 0.35
VALIDATION_SHARE = 0.2
MIN_SIZE = 32
CSV_NAME = "image_labels.csv"
# Skin tones (RGB, 0-255) from light to medium; an image draws a point between two neighbours.
_SKIN_TONES = np.array([[238, 206, 184], [226, 184, 158], [214, 168, 138], [198, 150, 118]], np.float32)
_BROWN_TINT = np.array([1.0, 0.82, 0.68], np.float32)  # melanin: less green and blue than the skin


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean and unit std: float32 (H, W)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    """Skin background: float32 (H, W, 3) in 0-255, tone + low-frequency shading + fine grain + mild vignette."""
    i = int(rng.integers(len(_SKIN_TONES) - 1))
    tone = _SKIN_TONES[i] + float(rng.uniform()) * (_SKIN_TONES[i + 1] - _SKIN_TONES[i])
    shading = 1.0 + 0.06 * _smooth_field(rng, (size, size), size / 5.0)  # uneven light and skin thickness
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / (size - 1) - 0.5
    vignette = 1.0 - 0.12 * (xx ** 2 + yy ** 2) / 0.5  # dermatoscope optics darken the corners a little
    grain = 5.0 * _smooth_field(rng, (size, size), 0.8)[..., None]  # pores and creases, shared by the channels
    colour_grain = 2.0 * rng.standard_normal((size, size, 3)).astype(np.float32)  # camera noise
    return tone * (shading * vignette)[..., None] + grain + colour_grain


def _boundary(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Radius of a lobulated, rotated ellipse as a function of angle: (angles (K,), radius (K,)) for radius 1."""
    angles = np.linspace(0.0, 2.0 * math.pi, 720, endpoint=False)
    ratio, rotation = float(rng.uniform(0.65, 1.0)), float(rng.uniform(0.0, math.pi))
    # Polar radius of an ellipse with semi-axes 1 and ratio, rotated.
    c, s = np.cos(angles - rotation), np.sin(angles - rotation)
    radius = ratio / np.sqrt((ratio * c) ** 2 + s ** 2)
    lobes = sum(rng.uniform(0.0, 0.12 / k ** 0.5) * np.cos(k * angles + rng.uniform(0, 2 * math.pi))
                for k in range(2, 8))  # a few smooth bumps: an irregular, not a jagged, border
    return angles, radius * (1.0 + lobes)


def _lesion(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, depth), float32 (H, W): soft coverage (0-1; mask = alpha >= 0.5), depth (1 centre, 0 border)."""
    angles, shape = _boundary(rng)
    xs, ys = shape * np.cos(angles), shape * np.sin(angles)
    width = float(rng.uniform(*_DRAWN_FRACTION)) * size
    scale = width / float(xs.max() - xs.min())  # pixels per unit radius: the mask's width is the drawn one
    margin = 0.03 * size
    cx = rng.uniform(margin - xs.min() * scale, size - 1 - margin - xs.max() * scale)
    cy = rng.uniform(margin - ys.min() * scale, size - 1 - margin - ys.max() * scale)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dx, dy = xx - np.float32(cx), yy - np.float32(cy)
    rho = np.hypot(dx, dy)
    theta = np.mod(np.arctan2(dy, dx), 2.0 * math.pi)
    edge = np.interp(theta, angles, shape, period=2.0 * math.pi).astype(np.float32) * np.float32(scale)
    signed = rho - edge  # pixels, negative inside (radial: exact enough for a star-shaped blob)
    softness = max(1.0, float(rng.uniform(0.04, 0.12)) * width)  # soft edge, a few pixels wide
    alpha = np.clip(0.5 - signed / softness, 0.0, 1.0)
    depth = np.clip(-signed / np.maximum(edge, 1.0), 0.0, 1.0)
    return alpha.astype(np.float32), depth.astype(np.float32)


def _hairs(rng: np.random.Generator, size: int) -> np.ndarray:
    """Coverage of 1-4 thin dark curved hairs: float32 (H, W) in 0-1."""
    canvas = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(1, 5))):
        n = int(rng.uniform(0.4, 1.2) * size * 2)  # points every half pixel
        heading = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0, 0.02, n))  # gently curving
        x = rng.uniform(0, size) + np.cumsum(0.5 * np.cos(heading))
        y = rng.uniform(0, size) + np.cumsum(0.5 * np.sin(heading))
        inside = (x >= 0) & (x <= size - 1) & (y >= 0) & (y <= size - 1)
        line = np.zeros_like(canvas)
        line[np.rint(y[inside]).astype(int), np.rint(x[inside]).astype(int)] = 1.0
        if rng.uniform() < 0.4:
            line = ndimage.maximum_filter(line, size=2)  # a thicker hair
        canvas = np.maximum(canvas, line)
    return np.clip(ndimage.gaussian_filter(canvas, 0.5) * 2.5, 0.0, 1.0)  # anti-aliased


def make_skin_image(size: int, lesion: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic dermoscopy-like picture: (RGB uint8 (size, size, 3), mask uint8 (size, size) in {0, 1}).

    The mask is all zeros when ``lesion`` is False. A lesion's mask bounding box spans
    ``WIDTH_FRACTION`` of the width; its colour is the skin's darkened and tinted brown, darkest
    at the centre, so it is always clearly darker than the skin around it.
    """
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    rng = np.random.default_rng(seed)
    image = _skin(rng, size)
    mask = np.zeros((size, size), np.uint8)
    if lesion:
        alpha, depth = _lesion(rng, size)
        rim, centre = float(rng.uniform(0.5, 0.65)), float(rng.uniform(0.2, 0.35))  # brightness relative to skin
        brightness = rim + (centre - rim) * np.sqrt(depth)  # darker centre, brown rim
        mottle = 1.0 + 0.08 * _smooth_field(rng, (size, size), max(1.0, size / 40.0))  # pigment network, roughly
        colour = image * _BROWN_TINT * (brightness * mottle)[..., None]
        image = image + alpha[..., None] * (colour - image)
        mask = (alpha >= 0.5).astype(np.uint8)
    if rng.uniform() < HAIR_PROBABILITY:  # drawn last: hairs lie over skin and lesion alike
        hair = _hairs(rng, size)[..., None]
        shade = rng.uniform(25.0, 60.0) * np.array([1.0, 0.85, 0.75], np.float32)
        image = image + 0.85 * hair * (shade - image)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def _write_png(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 3)
    sitk.WriteImage(image, str(path))


def write_skin_dataset(out_dir: str | os.PathLike, n_lesion: int, n_healthy: int, size: int, seed: int,
                       rebuild: bool = False) -> Path:
    """Write ``n_lesion`` + ``n_healthy`` pictures into ``out_dir``; returns it.

    ``images/<name>.png`` (RGB), ``masks/<name>.png`` (lesion pictures only, 0/255),
    ``image_labels.csv`` (image,label,slices,split; slices empty: 2D) where the last 20% of
    each class (rounded half up) is ``validation`` and the rest ``training``, and a README.md.
    Written to a temporary folder then renamed; an existing ``out_dir`` is replaced only with
    ``rebuild`` and only when it holds ``image_labels.csv``.
    """
    out_dir = Path(out_dir)
    if n_lesion < 0 or n_healthy < 0 or n_lesion + n_healthy == 0:
        raise ValueError(f"need a non-negative number of pictures per class, at least one in all "
                         f"(got {n_lesion} lesion, {n_healthy} healthy)")
    if out_dir.exists() and not (rebuild and (out_dir / CSV_NAME).is_file()):
        raise DatasetError(f"{out_dir} exists; pass rebuild=True to replace a skin dataset written here")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        staging.chmod(0o755)  # mkdtemp makes it owner-only; the dataset is shared like its siblings
        (staging / "images").mkdir()
        (staging / "masks").mkdir()
        rows = []
        for class_id, (label, count) in enumerate((("lesion", n_lesion), ("healthy", n_healthy))):
            n_validation = int(math.floor(VALIDATION_SHARE * count + 0.5))
            for i in range(count):
                name = f"{label}_{i:04d}"
                # Independent streams per class and picture: adding pictures never changes earlier ones.
                image_seed = int(np.random.SeedSequence([seed, class_id, i]).generate_state(1)[0])
                rgb, mask = make_skin_image(size, label == "lesion", image_seed)
                _write_png(rgb, staging / "images" / f"{name}.png")
                if label == "lesion":
                    _write_png(mask * np.uint8(255), staging / "masks" / f"{name}.png")
                split = "validation" if i >= count - n_validation else "training"
                rows.append((f"images/{name}.png", label, "", split))
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(("image", "label", "slices", "split"))
        writer.writerows(rows)
        (staging / CSV_NAME).write_text(text.getvalue(), encoding="utf-8")
        (staging / "README.md").write_text(
            "# Synthetic dermoscopy-like pictures\n\n"
            f"Made by `DiffusionSegLib.bench.synthetic_skin.write_skin_dataset` (size {size}, seed {seed}): "
            f"{n_lesion} lesion and {n_healthy} healthy RGB pictures. SYNTHETIC, not real dermoscopy: they test that "
            "the pipeline runs on 2D RGB images, not accuracy on skin lesions. `masks/` (0/255) exist for the lesion "
            f"pictures only; training uses the image-level labels of `{CSV_NAME}`.\n", encoding="utf-8")
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
