"""Anatomical coordinates without labels (issue 15, first building block).

A small 3D network (``CoordinateNet``) maps every voxel of a CT patch to 3 numbers in mm, its
"universal body-part coordinates", trained self-supervised on unlabelled scans (``train_coordinates``).

The objective (``coordinate_loss``) looks at two views a and b of ONE scan: two crops that overlap,
each with its own intensity augmentation (scale, shift, noise, gamma), sometimes cut down to a thin
slab (a scan that ends sooner, ``keep_slab``).

* distance: for random voxel pairs (i, j) inside one view, ``| ||c_i - c_j|| - ||p_i - p_j|| |`` in mm,
  with ``p`` the physical position of the voxel in the scan (grid index * spacing). It is zero exactly
  when the map is an isometry of the patch (a rigid motion, possibly with a reflection): coordinates
  are distances in mm, with no free scale.
* consistency: for voxels present in both views, ``||c^a(p) - c^b(p)||``: the same physical voxel gets
  the same coordinates whatever the crop and the intensities. There is deliberately NO free
  translation (nor rotation) per view: a network that reports the position inside its patch satisfies
  the distance term perfectly, but the two crops have different offsets, so it would pay the crop shift
  here. The only way to satisfy both terms is to read the position off the anatomy the network sees,
  which is what makes the coordinates anatomy-anchored instead of patch-anchored.

Why it does not collapse: the consistency term alone is minimised by constant outputs, but a constant
map pays the full mean physical pair distance in the distance term (about 50 mm for a 128 mm patch);
the distance term is zero only for maps that spread the voxels exactly as far apart as they are in the
body. The two terms share units (mm) and are added with a weight (1 by default).

What the loss does NOT give: nothing compares two patients, so each scan's coordinates are defined only
up to its own rigid motion. Consistency across patients comes from weight sharing: one network, a
function of the local anatomy only (the consistency term forbids patch position), assigns similar
coordinates to similar anatomy. ``organ_consistency`` and ``transfer_labels`` measure whether it does.
Offset networks can also be tied across patients on chosen axes: ``anchors`` give each scan's common
origin (head-foot: its lung base, found without labels by ``alignment.lung_base_levels``) and
``anchor_term`` asks every crop to agree with it.

Volumes are (D, H, W) arrays in the same axis order as their spacing (z, y, x), CT normalised by
``ct_window``; voxels outside a scan (crop padding, sliding-window padding) are filled with
``BACKGROUND`` (air). Weights are stored with safetensors next to a JSON card.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.networks.layers.factories import Conv
from torch import nn

from DiffusionSegLib.core.files import atomic_write_bytes, atomic_write_json
from DiffusionSegLib.methods.blocks import ResBlock, norm_groups_for

WEIGHTS_FILE = "coordinates.safetensors"
CARD_FILE = "coordinates.json"
CARD_FORMAT = 1
CT_LOW, CT_HIGH = -1000.0, 1000.0
# Air after ct_window: the value outside a scan, in training crops and in sliding-window padding alike,
# so the network sees the same thing at a field-of-view edge in training and in inference.
BACKGROUND = -1.0
Triple = tuple[int, int, int]


def ct_window(hu: np.ndarray, low: float = CT_LOW, high: float = CT_HIGH) -> np.ndarray:
    """HU (any shape) -> float32 in [-1, 1]: clipped to [low, high], scaled linearly."""
    hu = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    return (2.0 * (hu - low) / (high - low) - 1.0).astype(np.float32)


class CoordinateNet(nn.Module):
    """Small 3D encoder-decoder (residual blocks, skip connections): (B, Cin, D, H, W) -> (B, 3, D, H, W) mm.

    ``channels`` gives one resolution level each (stride-2 downsampling between levels), so the
    spatial sizes must be multiples of ``size_divisor``. The head's output is multiplied by
    ``output_scale_mm`` so that coordinates of a few hundred mm are outputs of order 1 for the network.
    ``output_level`` > 0 stops the decoder at that level (1/2^level resolution) and upsamples the
    coordinates trilinearly: a coordinate field is smooth by nature (an isometry), so predicting it
    coarse is a prior against voxel-scale noise and folds, and saves the full-resolution decoder.

    ``output="offset"`` is the rigid parameterisation: no decoder; the pooled deepest features give ONE
    translation t (B, 3) per patch and every voxel gets ``its position in the patch (mm, from the patch
    centre; needs spacing_mm) + t``. The map is then an isometry of the patch by construction (the
    distance term is 0), with the scanner's axis directions, and all the network has to learn is where
    the patch lies in the body: crop consistency makes t(patch) - centre(patch) the same for every patch
    of a scan. Sliding windows blend the translations of neighbouring windows, so a whole volume gets a
    smoothly varying translation field.
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (8, 16, 32), norm_groups: int = 4,
                 output_scale_mm: float = 100.0, output_level: int = 0, output: str = "dense",
                 spacing_mm: Sequence[float] | None = None):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels:
            raise ValueError("channels needs at least one level")
        if not 0 <= output_level < len(channels):
            raise ValueError(f"output_level must be in [0, {len(channels) - 1}]")
        if output not in ("dense", "offset"):
            raise ValueError(f"output must be 'dense' or 'offset', not {output!r}")
        if output == "offset" and (spacing_mm is None or len(spacing_mm) != 3 or min(spacing_mm) <= 0):
            raise ValueError("output='offset' needs spacing_mm: 3 positive voxel sizes (z, y, x)")
        self.output = output
        self.spacing_mm = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)
        if output == "offset":
            output_level = len(channels) - 1  # no decoder: the translation comes from the deepest level
        self.output_level = int(output_level)
        conv, convtrans = Conv[Conv.CONV, 3], Conv[Conv.CONVTRANS, 3]
        self.in_channels, self.channels, self.norm_groups = in_channels, channels, norm_groups
        self.output_scale_mm = float(output_scale_mm)
        self.size_divisor = 2 ** (len(channels) - 1)
        # Offset networks also see every voxel's position in the patch (3 channels, mm / output_scale_mm):
        # pooled features can then say where things lie relative to the patch centre (e.g. the body's
        # centre 30 mm to the left), which is what the translation is made of.
        extra = 3 if output == "offset" else 0
        self.stem = conv(in_channels + extra, channels[0], 3, padding=1)
        self.down = nn.ModuleList(conv(channels[i - 1], channels[i], 3, stride=2, padding=1)
                                  for i in range(1, len(channels)))
        self.encoder = nn.ModuleList(ResBlock(3, c, c, norm_groups) for c in channels)
        # Decoder level i - 1 (for i > output_level): upsample level i, concatenate the skip, one block.
        self.up = nn.ModuleList(convtrans(channels[i], channels[i - 1], 2, stride=2)
                                for i in range(output_level + 1, len(channels)))
        self.decoder = nn.ModuleList(ResBlock(3, 2 * channels[i - 1], channels[i - 1], norm_groups)
                                     for i in range(output_level + 1, len(channels)))
        top = channels[output_level]
        if output == "offset":
            self.head = nn.Sequential(nn.GroupNorm(norm_groups_for(top, norm_groups), top), nn.SiLU(),
                                      nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(top, top), nn.SiLU(),
                                      nn.Linear(top, 3))
        else:
            self.head = nn.Sequential(nn.GroupNorm(norm_groups_for(top, norm_groups), top), nn.SiLU(),
                                      conv(top, 3, 1))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a card needs to rebuild the network)."""
        config = {"in_channels": self.in_channels, "channels": list(self.channels), "norm_groups": self.norm_groups,
                  "output_scale_mm": self.output_scale_mm, "output_level": self.output_level}
        if self.output == "offset":  # dense cards keep their original keys
            config.update(output="offset", spacing_mm=list(self.spacing_mm))
        return config

    def patch_positions(self, size: Sequence[int]) -> torch.Tensor:
        """Offset networks: (3, D, H, W) positions (mm, z y x) of a patch's voxels from the patch centre."""
        return grid_points(size, self.spacing_mm, [-(n - 1) / 2 * s for n, s in zip(size, self.spacing_mm)])

    def translation(self, x: torch.Tensor) -> torch.Tensor:
        """Offset networks only: x (B, Cin, D, H, W) -> (B, 3) mm, where the patch centre lies in the body frame."""
        if self.output != "offset":
            raise ValueError("translation() is defined for output='offset' networks only")
        local = self.patch_positions(x.shape[2:]).to(x) / self.output_scale_mm
        h = self.encoder[0](self.stem(torch.cat([x, local[None].expand(x.shape[0], -1, -1, -1, -1)], dim=1)))
        for down, block in zip(self.down, self.encoder[1:]):
            h = block(down(h))
        return self.head(h) * self.output_scale_mm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, D, H, W), sizes multiples of size_divisor -> (B, 3, D, H, W) coordinates in mm."""
        if any(s % self.size_divisor for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not a multiple of {self.size_divisor}")
        if self.output == "offset":
            return self.patch_positions(x.shape[2:]).to(x)[None] + self.translation(x)[:, :, None, None, None]
        h = self.encoder[0](self.stem(x))
        skips = [h]
        for down, block in zip(self.down, self.encoder[1:]):
            h = block(down(h))
            skips.append(h)
        for level in reversed(range(len(self.up))):  # module index `level` ends at resolution output_level + level
            h = self.decoder[level](torch.cat([self.up[level](h), skips[self.output_level + level]], dim=1))
        out = self.head(h) * self.output_scale_mm
        if self.output_level:
            out = F.interpolate(out, size=x.shape[2:], mode="trilinear", align_corners=False)
        return out


def grid_points(shape: Sequence[int], spacing: Sequence[float], origin: Sequence[float] = (0.0, 0.0, 0.0)
                ) -> torch.Tensor:
    """Physical positions (mm) of a regular axis-aligned grid: (3, D, H, W), channel k = origin_k + index_k * spacing_k."""
    axes = [origin[k] + spacing[k] * torch.arange(shape[k], dtype=torch.float64) for k in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).float()


def distance_term(coords: torch.Tensor, points: torch.Tensor, valid: torch.Tensor | None = None,
                  pairs: int | None = 512, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Mean | ||c_i - c_j|| - ||p_i - p_j|| | over voxel pairs of one view (mm), None with fewer than 2 voxels.

    coords, points: (3, D, H, W); valid: (D, H, W) bool (voxels inside the scan). ``pairs=None`` takes
    every unordered pair of distinct voxels (exact, for small views and hand checks); otherwise that
    many random pairs i != j, drawn with ``generator``.
    """
    index = _valid_index(valid, coords)
    n = index.numel()
    if n < 2:
        return None
    c = coords.reshape(3, -1)[:, index].T
    p = points.reshape(3, -1)[:, index.to(points.device)].T.to(c)
    if pairs is None:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        i = torch.randint(n, (pairs,), generator=generator)
        j = (i + torch.randint(1, n, (pairs,), generator=generator)) % n  # never the voxel itself
    i, j = i.to(c.device), j.to(c.device)
    # vector_norm's gradient at 0 is 0 (not NaN), so coinciding outputs (a collapsed start) are safe.
    return (torch.linalg.vector_norm(c[i] - c[j], dim=1) - torch.linalg.vector_norm(p[i] - p[j], dim=1)).abs().mean()


def consistency_term(coords_a: torch.Tensor, coords_b: torch.Tensor, points_a: torch.Tensor, points_b: torch.Tensor,
                     valid_a: torch.Tensor | None = None, samples: int | None = 512,
                     generator: torch.Generator | None = None, valid_b: torch.Tensor | None = None
                     ) -> torch.Tensor | None:
    """Mean ||c^a(p) - c^b(p)|| (mm) over valid voxels p of view a that are valid voxels of view b; None when none are.

    coords_*, points_*: (3, D, H, W) (the two views may differ in size); valid_*: (D, H, W) bool
    (view b's mask is read at the nearest voxel).
    points_b must be a regular axis-aligned grid (what a crop gives); view b is read at view a's voxel
    positions by trilinear interpolation, which is exact when the crops differ by whole voxels.
    ``samples=None`` uses every shared voxel, otherwise that many random ones.
    """
    sizes = points_b.shape[1:]
    flat_b = points_b.reshape(3, -1)
    origin = flat_b[:, 0]
    step = torch.stack([(flat_b[k, -1] - origin[k]) / (sizes[k] - 1) if sizes[k] > 1 else origin.new_tensor(1.0)
                        for k in range(3)])
    where = ((points_a.reshape(3, -1) - origin[:, None]) / step[:, None]).to(coords_b)  # (3, N) indices in b
    top = torch.tensor([s - 1 for s in sizes], dtype=where.dtype, device=where.device)[:, None]
    inside = ((where >= -1e-4) & (where <= top + 1e-4)).all(dim=0)
    if valid_a is not None:
        inside &= valid_a.reshape(-1).to(inside.device)
    if valid_b is not None:
        nearest = torch.minimum(where.round().clamp(min=0), top).long()
        flat = (nearest[0] * sizes[1] + nearest[1]) * sizes[2] + nearest[2]
        inside &= valid_b.reshape(-1).to(inside.device)[flat]
    index = inside.nonzero().squeeze(1)
    if index.numel() == 0:
        return None
    if samples is not None:
        index = index[torch.randint(index.numel(), (samples,), generator=generator).to(index.device)]
    where = where[:, index]
    # grid_sample wants (x, y, z) = (W, H, D) order, each in [-1, 1] (align_corners: -1 and 1 are the end voxels).
    norm = torch.where(top > 0, 2.0 * where / top.clamp(min=1) - 1.0, torch.zeros_like(where))
    grid = norm.flip(0).T.reshape(1, 1, 1, -1, 3)
    read_b = F.grid_sample(coords_b[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    read_b = read_b.reshape(3, -1)
    read_a = coords_a.reshape(3, -1)[:, index.to(coords_a.device)]
    return torch.linalg.vector_norm(read_a - read_b, dim=0).mean()


def coordinate_loss(coords_a: torch.Tensor, coords_b: torch.Tensor, points_a: torch.Tensor, points_b: torch.Tensor,
                    valid_a: torch.Tensor | None = None, valid_b: torch.Tensor | None = None,
                    pairs: int | None = 512, samples: int | None = 512, consistency_weight: float = 1.0,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The self-supervised objective for a batch of view pairs (see the module docstring).

    coords_a/b: (B, 3, D, H, W) network outputs for the two views of the same B scans; points_a/b:
    (B, 3, D, H, W) physical positions (mm) of their voxels, in one frame per scan; valid_a/b:
    (B, D, H, W) bool, voxels inside the scan (padding is left out). Returns scalar tensors
    ``distance`` (mean over both views and the batch), ``consistency`` and ``total`` =
    distance + consistency_weight * consistency, all in mm.
    """
    distances, consistencies = [], []
    for n in range(coords_a.shape[0]):
        va = None if valid_a is None else valid_a[n]
        vb = None if valid_b is None else valid_b[n]
        for c, p, v in ((coords_a[n], points_a[n], va), (coords_b[n], points_b[n], vb)):
            d = distance_term(c, p, v, pairs, generator)
            if d is not None:
                distances.append(d)
        k = consistency_term(coords_a[n], coords_b[n], points_a[n], points_b[n], va, samples, generator, vb)
        if k is not None:
            consistencies.append(k)
    zero = coords_a.sum() * 0.0  # keeps the graph (and the device) when a term has nothing to measure
    distance = torch.stack(distances).mean() if distances else zero
    consistency = torch.stack(consistencies).mean() if consistencies else zero
    return {"distance": distance, "consistency": consistency, "total": distance + consistency_weight * consistency}


def offset_consistency(translation_a: torch.Tensor, translation_b: torch.Tensor, centre_a: torch.Tensor,
                       centre_b: torch.Tensor) -> torch.Tensor:
    """The crop-consistency term of offset networks (mm): mean over the batch of ||(t_a - centre_a) - (t_b - centre_b)||.

    translation_*: (B, 3) the networks' translations of the two views; centre_*: (B, 3) physical
    positions (mm, one frame per scan) of the views' centres. An offset network maps a physical point p
    of view v to p - centre_v + t_v, so the two views agree on EVERY point exactly when this is 0; the
    views need not overlap.
    """
    return torch.linalg.vector_norm((translation_a - centre_a) - (translation_b - centre_b), dim=1).mean()


def anchor_term(translation: torch.Tensor, centre: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The anchoring term of offset networks (mm): mean over views of sum over anchored axes |t - centre + anchor|.

    translation, centre: (B, 3) as in ``offset_consistency``; anchor: (B, 3) where, in the view's scan
    frame (mm), the common origin lies (``alignment.lung_base_levels`` for z), NaN on free axes. A view's map
    p -> p - centre + t equals the common frame p -> p - anchor exactly when the term is 0. 0 (with
    gradient) when no axis is anchored.
    """
    anchored = torch.isfinite(anchor)
    gap = torch.where(anchored, translation - centre + torch.nan_to_num(anchor), torch.zeros_like(translation))
    return gap.abs().sum(dim=1).mean()


def crop_pair_starts(shape: Sequence[int], patch: Sequence[int], max_shift: Sequence[int],
                     rng: np.random.Generator) -> tuple[Triple, Triple]:
    """Start indices of two overlapping crops of ``patch`` in a volume of ``shape``.

    Along an axis longer than the patch both crops stay inside the volume; along a shorter one the crop
    holds the whole axis plus padding (negative starts). The second crop is the first shifted by at most
    ``max_shift`` voxels per axis (< patch, so they overlap).
    """
    a, b = [], []
    for size, p, m in zip(shape, patch, max_shift):
        lo, hi = (0, size - p) if size >= p else (size - p, 0)
        start = int(rng.integers(lo, hi + 1))
        a.append(start)
        b.append(int(np.clip(start + int(rng.integers(-m, m + 1)), lo, hi)))
    return tuple(a), tuple(b)  # type: ignore[return-value]


def augment_intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random gamma, scale, shift and Gaussian noise on a [-1, 1]-normalised patch (any shape)."""
    gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    y = 2.0 * np.clip((x + 1.0) / 2.0, 0.0, 1.0) ** gamma - 1.0
    y = y * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    return (y + rng.normal(0.0, rng.uniform(0.0, 0.05), size=x.shape)).astype(np.float32)


def keep_slab(image: np.ndarray, valid: np.ndarray, start: int, thickness: int) -> tuple[np.ndarray, np.ndarray]:
    """A crop as if the scan ended above and below: axis-0 slices outside [start, start + thickness) become
    BACKGROUND and invalid. image: (D, H, W) float; valid: (D, H, W) bool -> both, new arrays."""
    keep = np.zeros(image.shape[0], bool)
    keep[max(start, 0):max(start + thickness, 0)] = True
    return (np.where(keep[:, None, None], image, BACKGROUND).astype(np.float32),
            valid & keep[:, None, None])


def train_coordinates(volumes: Sequence[tuple[np.ndarray, Sequence[float]]], steps: int = 1000,
                      patch: Sequence[int] = (32, 32, 32), batch: int = 2, lr: float = 1e-3, seed: int = 0,
                      device: str | torch.device = "cpu", channels: Sequence[int] = (8, 16, 32), norm_groups: int = 4,
                      output_level: int = 0,
                      pairs: int = 512, samples: int = 512, consistency_weight: float = 1.0,
                      max_shift: Sequence[int] | None = None, augment: bool = True, slab_probability: float = 0.25,
                      output: str = "dense", initial_state: Mapping[str, torch.Tensor] | None = None,
                      anchors: Sequence[Sequence[float]] | None = None, anchor_weight: float = 1.0
                      ) -> tuple[CoordinateNet, list[dict[str, float]]]:
    """Train a CoordinateNet on unlabelled volumes; returns (network in eval mode, per-step log).

    volumes: (array (D, H, W) float32 normalised by ``ct_window``, spacing (z, y, x) mm). Each step
    draws ``batch`` scans (uniformly), two overlapping crops of each (``crop_pair_starts``, shift up to
    ``max_shift``, default half the patch) with their own intensity augmentation, and takes one Adam
    step on ``coordinate_loss`` (learning rate cosine-decayed to lr/10). With ``slab_probability`` a view
    keeps only a random slab of 4 to patch/2 slices along axis 0 (``keep_slab``): real scans often end a
    few cm above and below the organ of interest, and the consistency term then asks the slab to get the
    coordinates the full view gives. Axis 0 should be the cranio-caudal one (z of LPS-oriented arrays).
    ``output="offset"`` trains the rigid parameterisation (``CoordinateNet``) on ``offset_consistency``
    alone (its distance term is 0 by construction); the views may then be far apart (``max_shift``
    default: a whole patch) and the volumes must share one spacing.
    ``initial_state`` (a state dict of the same network, e.g. ``load_coordinate_model(...)[0].state_dict()``)
    continues an earlier run with a fresh learning-rate schedule.
    ``anchors`` (offset only): one (z, y, x) per volume, where its scan frame (mm from its first voxel)
    puts the common origin, NaN on free axes (e.g. ``alignment.lung_base_levels`` for z): ``anchor_term``
    times ``anchor_weight`` is added, tying the scans' frames to each other on those axes.
    Seeded: the same arguments give bit-identical weights on CPU.
    """
    patch = tuple(int(p) for p in patch)
    if max_shift is None:
        max_shift = patch if output == "offset" else tuple(p // 2 for p in patch)
    max_shift = tuple(int(m) for m in max_shift)
    device = torch.device(device)
    torch.manual_seed(seed)
    spacing_mm = _common_spacing(volumes)
    if output == "offset" and spacing_mm is None:
        raise ValueError("output='offset' needs volumes that share one spacing")
    if anchors is not None:
        anchors = np.asarray(anchors, dtype=np.float64)
        if output != "offset":
            raise ValueError("anchors need output='offset' (a dense map has no per-view translation)")
        if anchors.shape != (len(volumes), 3):
            raise ValueError(f"anchors must be one (z, y, x) per volume: shape ({len(volumes)}, 3), not {anchors.shape}")
    net = CoordinateNet(1, channels, norm_groups, output_level=output_level, output=output,
                        spacing_mm=spacing_mm if output == "offset" else None).to(device)
    if any(p % net.size_divisor for p in patch):
        raise ValueError(f"patch {patch} is not a multiple of {net.size_divisor}")
    if initial_state is not None:
        net.load_state_dict(initial_state, strict=True)  # raises on another architecture
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    # Padding once by a whole patch lets every crop (even one sticking out of a thin slab) be a plain slice.
    padded = [np.pad(np.asarray(v, dtype=np.float32), [(p, p) for p in patch], constant_values=BACKGROUND)
              for v, _ in volumes]
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    log = []
    net.train()
    for step in range(steps):
        views = {"a": ([], [], []), "b": ([], [], [])}  # images, points, valid masks
        scans = []
        for _ in range(batch):
            k = int(rng.integers(len(volumes)))
            scans.append(k)
            shape, spacing = volumes[k][0].shape, tuple(float(s) for s in volumes[k][1])
            starts = crop_pair_starts(shape, patch, max_shift, rng)
            for name, start in zip("ab", starts):
                region = tuple(slice(s + p, s + 2 * p) for s, p in zip(start, patch))
                image = padded[k][region]
                inside = [(np.arange(p) + s >= 0) & (np.arange(p) + s < size) for s, p, size in zip(start, patch, shape)]
                valid = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
                if rng.random() < slab_probability:
                    rows = np.flatnonzero(inside[0])
                    thickness = int(rng.integers(4, max(patch[0] // 2, 4) + 1))
                    first = int(rng.integers(rows[0], max(rows[-1] - thickness + 1, rows[0]) + 1))
                    image, valid = keep_slab(image, valid, first, thickness)
                views[name][0].append(augment_intensity(image, rng) if augment else image)
                # One frame per scan (its voxel grid, in mm): both crops' points are in it.
                views[name][1].append(grid_points(patch, spacing, [s * d for s, d in zip(start, spacing)]))
                views[name][2].append(torch.from_numpy(valid))
        images = torch.from_numpy(np.stack(views["a"][0] + views["b"][0])[:, None]).to(device)
        if output == "offset":
            shift = torch.tensor([(p - 1) / 2 * d for p, d in zip(patch, spacing_mm)])
            centres = torch.stack([points[:, 0, 0, 0] for points in views["a"][1] + views["b"][1]]).to(device)
            centres = centres + shift.to(device)  # the first voxel's position + half a patch
            t = net.translation(images)
            term = offset_consistency(t[:batch], t[batch:], centres[:batch], centres[batch:])
            losses = {"distance": term * 0.0, "consistency": term, "total": term}
            if anchors is not None:
                anchor = torch.as_tensor(anchors[scans + scans], dtype=t.dtype, device=device)
                losses["anchor"] = anchor_term(t, centres, anchor)
                losses["total"] = term + anchor_weight * losses["anchor"]
        else:
            coords = net(images)
            losses = coordinate_loss(coords[:batch], coords[batch:], torch.stack(views["a"][1]).to(device),
                                     torch.stack(views["b"][1]).to(device), torch.stack(views["a"][2]).to(device),
                                     torch.stack(views["b"][2]).to(device), pairs, samples, consistency_weight, generator)
        optimiser.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimiser.step()
        schedule.step()
        log.append({"step": step + 1, **{k: float(v.detach()) for k, v in losses.items()}})
    net.eval()
    net.trained_spacing = _common_spacing(volumes)
    net.trained_patch = patch
    return net, log


def predict_coordinates(net: CoordinateNet, volume: np.ndarray, spacing: Sequence[float] | None = None,
                        patch: Sequence[int] | None = None, overlap: float = 0.5, sw_batch_size: int = 2
                        ) -> np.ndarray:
    """Coordinates of a whole volume by Gaussian-blended sliding windows: (D, H, W) -> (3, D, H, W) float32 mm.

    ``volume`` is normalised by ``ct_window`` and sampled at the spacing the network was trained at
    (checked when both are known); windows are ``patch`` (default: the training patch), the volume is
    padded with ``BACKGROUND`` where it is smaller.
    """
    trained = getattr(net, "trained_spacing", None)
    if spacing is not None and trained is not None and not np.allclose(spacing, trained, rtol=0.01):
        raise ValueError(f"volume spacing {tuple(spacing)} differs from the training spacing {tuple(trained)}: resample it")
    patch = tuple(patch or getattr(net, "trained_patch", None) or (32, 32, 32))
    device = next(net.parameters()).device
    x = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None, None].to(device)
    return air_padded_windows(net, x, patch, sw_batch_size, overlap)[0].cpu().numpy().astype(np.float32)


def air_padded_windows(predict: Any, x: torch.Tensor, patch: Sequence[int], sw_batch_size: int = 2,
                       overlap: float = 0.5) -> torch.Tensor:
    """``predict`` over a whole (1, C, D, H, W) volume by Gaussian-blended sliding windows of ``patch``,
    without gradients; outside the volume is ``BACKGROUND`` (air), as in the training crops."""
    with torch.no_grad():
        return sliding_window_inference(x, list(patch), sw_batch_size, predict, overlap=overlap, mode="gaussian",
                                        padding_mode="constant", cval=BACKGROUND)


def smoothness(coords: np.ndarray, spacing: Sequence[float], mask: np.ndarray | None = None) -> dict[str, float]:
    """How close the coordinate map is to a local isometry, from forward differences.

    coords: (3, D, H, W) mm; spacing (z, y, x) mm; mask (D, H, W) bool restricts the voxels (e.g. the
    body). Returns: ``within_20pct`` fraction of neighbour steps whose coordinate step is within 20% of
    the physical step; ``median_ratio`` of the two; ``isometry_error`` mean ||J^T J - I||_F (J the local
    Jacobian, 0 for a rigid map); ``folding`` fraction of voxels whose Jacobian determinant has the
    opposite sign of the median one (the map turns inside out there).
    """
    c = np.asarray(coords, dtype=np.float64)
    d, h, w = (s - 1 for s in c.shape[1:])
    if min(d, h, w) < 1:
        raise ValueError("smoothness needs at least 2 voxels along every axis")
    base = c[:, :d, :h, :w]
    columns = [(c[:, 1:d + 1, :h, :w] - base) / spacing[0], (c[:, :d, 1:h + 1, :w] - base) / spacing[1],
               (c[:, :d, :h, 1:w + 1] - base) / spacing[2]]
    jac = np.stack(columns, axis=-1).transpose(1, 2, 3, 0, 4)  # (d, h, w, 3 outputs, 3 axes)
    keep = np.ones((d, h, w), bool) if mask is None else np.asarray(mask, bool)[:d, :h, :w]
    jac = jac[keep]
    if not len(jac):
        raise ValueError("the mask leaves no voxel")
    ratios = np.linalg.norm(jac, axis=1)  # (n, 3 axes): coordinate step / physical step
    gram = np.einsum("nij,nik->njk", jac, jac)
    det = np.linalg.det(jac)
    sign = np.sign(np.median(det)) or 1.0
    return {"within_20pct": float(np.mean(np.abs(ratios - 1.0) <= 0.2)), "median_ratio": float(np.median(ratios)),
            "isometry_error": float(np.mean(np.linalg.norm(gram - np.eye(3), axis=(1, 2)))),
            "folding": float(np.mean(det * sign < 0))}


def organ_consistency(coords_a: np.ndarray, labels_a: np.ndarray, coords_b: np.ndarray, labels_b: np.ndarray,
                      organs: Mapping[str, int], points_a: np.ndarray, points_b: np.ndarray,
                      body_a: np.ndarray | None = None, body_b: np.ndarray | None = None) -> dict[str, Any]:
    """Does the same organ land at the same coordinates in two scans, better than in the scanner frame?

    coords_*: (3, D, H, W) learnt coordinates (mm); labels_*: (D, H, W) integer maps; organs: name ->
    label value; points_*: (3, D, H, W) scanner positions (mm) of the voxels; body_*: (D, H, W) bool
    masks whose centroids align the two scanner frames (default: the whole volume). Per organ present
    in both scans (mm):

    * ``learned``: distance between the organ's mean learnt coordinates in a and in b (no alignment:
      the coordinates are meant to be universal);
    * ``scanner``: the same with scanner positions after ONE translation (body centroid onto body centroid);
    * ``learned_best_translation`` / ``scanner_best_translation``: residual after the single translation
      that best superposes all shared organ centroids (least squares; it uses the labels, so it is a
      bound, not a label-free alignment): whether the organs' relative layout agrees;
    * ``identified_learned`` / ``identified_scanner``: whether the organ's centroid in a is nearer to the
      same organ's centroid in b than to any other shared organ's (learnt / body-aligned scanner frame).

    Small distances alone could come from a shrunken map (all centroids close together), so
    ``layout_scale`` gives, per scan, the median ratio of learnt to physical distances between the shared
    organs' centroids (1 for an isometry, near 0 for a collapse).

    Returns {"organs": {name: {... , "voxels_a", "voxels_b"}}, "mean": {column: mean over shared organs},
    "identified": {"learned": count, "scanner": count, "of": shared organs}, "layout_scale": {"a", "b"}}.
    """
    def centroid(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64).reshape(3, -1)[:, mask.reshape(-1)].mean(axis=1)

    whole_a = np.ones(labels_a.shape, bool) if body_a is None else np.asarray(body_a, bool)
    whole_b = np.ones(labels_b.shape, bool) if body_b is None else np.asarray(body_b, bool)
    shift = centroid(points_a, whole_a) - centroid(points_b, whole_b)
    rows: dict[str, dict[str, Any]] = {}
    shared: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for name, value in organs.items():
        mask_a, mask_b = np.asarray(labels_a) == value, np.asarray(labels_b) == value
        rows[name] = {"voxels_a": int(mask_a.sum()), "voxels_b": int(mask_b.sum())}
        if mask_a.any() and mask_b.any():
            shared[name] = (centroid(coords_a, mask_a), centroid(coords_b, mask_b),
                            centroid(points_a, mask_a), centroid(points_b, mask_b))
    columns = ("learned", "scanner", "learned_best_translation", "scanner_best_translation")
    if shared:
        best_learned = np.mean([ca - cb for ca, cb, _, _ in shared.values()], axis=0)
        best_scanner = np.mean([pa - pb for _, _, pa, pb in shared.values()], axis=0)
        for name, (ca, cb, pa, pb) in shared.items():
            rows[name].update(learned=float(np.linalg.norm(ca - cb)), scanner=float(np.linalg.norm(pa - pb - shift)),
                              learned_best_translation=float(np.linalg.norm(ca - cb - best_learned)),
                              scanner_best_translation=float(np.linalg.norm(pa - pb - best_scanner)))
    names = list(shared)
    for frame, (ia, ib, offset) in {"learned": (0, 1, np.zeros(3)), "scanner": (2, 3, shift)}.items():
        for name in names:
            gaps = [np.linalg.norm(shared[name][ia] - shared[other][ib] - offset) for other in names]
            rows[name][f"identified_{frame}"] = bool(int(np.argmin(gaps)) == names.index(name))
    scale = {}
    for side, (ic, ip) in {"a": (0, 2), "b": (1, 3)}.items():
        ratios = [np.linalg.norm(shared[m][ic] - shared[n][ic]) / np.linalg.norm(shared[m][ip] - shared[n][ip])
                  for i, m in enumerate(names) for n in names[i + 1:]
                  if np.linalg.norm(shared[m][ip] - shared[n][ip]) > 0]
        scale[side] = float(np.median(ratios)) if ratios else None
    for name in rows:
        for column in (*columns, "identified_learned", "identified_scanner"):
            rows[name].setdefault(column, None)
    mean = {column: (float(np.mean([rows[n][column] for n in shared])) if shared else None) for column in columns}
    identified = {frame: sum(rows[n][f"identified_{frame}"] for n in shared) for frame in ("learned", "scanner")}
    return {"organs": rows, "mean": mean, "identified": {**identified, "of": len(shared)}, "layout_scale": scale}


def transfer_labels(coords_source: np.ndarray, labels_source: np.ndarray, coords_target: np.ndarray,
                    known_source: np.ndarray | None = None) -> np.ndarray:
    """Label every target voxel with the label of the source voxel whose coordinates are nearest.

    coords_*: (3, *S) mm (learnt coordinates, or aligned scanner positions for a baseline); labels_source:
    (*S_source) integers; known_source: (*S_source) bool, source voxels whose label may be used (e.g.
    excluding slices without labels). Returns (*S_target) labels: an atlas-free label transfer whose
    agreement with the target's own labels says how well the coordinates match anatomy across scans.
    """
    from scipy.spatial import cKDTree

    src = np.asarray(coords_source, np.float64).reshape(3, -1).T
    lab = np.asarray(labels_source).reshape(-1)
    if known_source is not None:
        keep = np.asarray(known_source, bool).reshape(-1)
        src, lab = src[keep], lab[keep]
    _, nearest = cKDTree(src).query(np.asarray(coords_target, np.float64).reshape(3, -1).T)
    return lab[nearest].reshape(np.shape(coords_target)[1:])


# The normalisation every 3D pretraining card records (coordinate model and backbone alike).
CT_NORMALIZATION = {"kind": "ct_window", "low_hu": CT_LOW, "high_hu": CT_HIGH, "range": [-1.0, 1.0],
                    "background": BACKGROUND}


def save_weights_and_card(folder: str | Path, weights_file: str, card_file: str, net: nn.Module,
                          card: Mapping[str, Any]) -> Path:
    """Write ``net``'s weights (safetensors, never pickle) and ``card`` (JSON) into ``folder``, each atomically."""
    from safetensors.torch import save as safetensors_bytes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(folder / weights_file, safetensors_bytes(state))
    atomic_write_json(folder / card_file, dict(card))
    return folder


def read_card(folder: str | Path, card_file: str, kind: str, card_format: int) -> dict[str, Any]:
    """The JSON card of ``folder``; ValueError when it is not a ``kind`` card of ``card_format``."""
    import json

    path = Path(folder) / card_file
    card = json.loads(path.read_text(encoding="utf-8"))
    if card.get("format") != card_format or card.get("kind") != kind:
        raise ValueError(f"{path} is not a {kind.replace('_', ' ')} card (format {card_format})")
    return card


def load_weights(net: nn.Module, folder: str | Path, weights_file: str) -> None:
    """Load ``folder/weights_file`` (safetensors) into ``net``; every tensor must match (strict)."""
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(Path(folder) / weights_file)), strict=True)


def save_coordinate_model(folder: str | Path, net: CoordinateNet, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``coordinates.safetensors`` (weights) and ``coordinates.json`` (card) into ``folder``.

    The card gets the network's constructor arguments, the training spacing and patch and the CT
    normalisation; ``card`` adds fields (training data, steps, losses...). Never pickle.
    """
    spacing = getattr(net, "trained_spacing", None)
    patch = getattr(net, "trained_patch", None)
    full = {"format": CARD_FORMAT, "kind": "anatomical_coordinates", "network": net.config(),
            "spacing_mm": None if spacing is None else list(spacing), "patch": None if patch is None else list(patch),
            "normalization": CT_NORMALIZATION,
            "output": "3 coordinates per voxel in mm, a learnt anatomical frame (no scanner frame)", **(card or {})}
    return save_weights_and_card(folder, WEIGHTS_FILE, CARD_FILE, net, full)


def load_coordinate_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CoordinateNet, dict[str, Any]]:
    """(network in eval mode, card) from a folder written by ``save_coordinate_model``."""
    card = read_card(folder, CARD_FILE, "anatomical_coordinates", CARD_FORMAT)
    net = CoordinateNet(**card["network"])
    load_weights(net, folder, WEIGHTS_FILE)
    net.trained_spacing = None if card.get("spacing_mm") is None else tuple(card["spacing_mm"])
    net.trained_patch = None if card.get("patch") is None else tuple(card["patch"])
    return net.to(device).eval(), card


def grid_spacing(card: Mapping[str, Any], spacing: float | None) -> float | None:
    """The isotropic grid (mm) to run a coordinate model on: ``spacing`` if given, else the card's.

    Raises ValueError when ``spacing`` differs from the grid the model was trained on (its coordinates
    are only meaningful there)."""
    trained = card.get("spacing_mm")
    if trained is not None and spacing is not None and any(abs(t - spacing) > 1e-3 for t in trained):
        raise ValueError(f"--spacing {spacing} differs from the coordinate model's {trained}")
    return spacing if spacing is not None else (float(trained[0]) if trained else None)


def _valid_index(valid: torch.Tensor | None, coords: torch.Tensor) -> torch.Tensor:
    """Flat indices of the valid voxels of a (3, D, H, W) view (all voxels without a mask)."""
    if valid is None:
        return torch.arange(coords[0].numel(), device=coords.device)
    return valid.reshape(-1).nonzero().squeeze(1).to(coords.device)


def _common_spacing(volumes: Sequence[tuple[np.ndarray, Sequence[float]]]) -> tuple[float, ...] | None:
    """The spacing all training volumes share, None when they differ."""
    spacings = {tuple(round(float(s), 4) for s in sp) for _, sp in volumes}
    return next(iter(spacings)) if len(spacings) == 1 else None
