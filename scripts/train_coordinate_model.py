"""Train the anatomical coordinate model (issue 15, first building block) on the unlabelled CTs on this
machine and measure it on one held-out CT.

    OMP_NUM_THREADS=1 python scripts/train_coordinate_model.py -o runs/coordinates/v1 --steps 1500

CTs (each a different patient; copies of the same anatomy are left out):
  training  data/bench/organs/imagesTr/totalseg_example_ct          (abdomen, TotalSegmentator example)
            data/bench/lung_lesions/imagesTr/synth_chest_r0         (chest; r1/r2 are the same scan with other
                                                                      synthetic lesions, synth_base_* and
                                                                      data/organs_multi/imagesTr are slabs of
                                                                      totalseg_example_ct)
  held out  data/bench/organs/imagesTs/totalseg_example_ct_dicom    (upper-abdomen slab, 40 mm)
The two lung test CTs (data/bench/lung_lesions/imagesTs) are not used: they are a benchmark's test set.

Every CT is turned to LPS axes, smoothed and resampled to 6 mm isotropic (SimpleITK), clipped to
-1000..1000 HU and scaled to [-1, 1]. No label is used for training. For the report, the held-out CT and
the training abdomen CT (whose 11-organ map is reassembled from the three slabs of data/organs_multi;
the 4 slices between slabs have no labels and are left out) are compared: smoothness of the coordinates
on the held-out CT, organ centroids (``organ_consistency``) and label transfer by nearest coordinates,
each against the scanner frame aligned by ONE translation (body centroid onto body centroid).
The label maps are TotalSegmentator's own predictions, not manual ground truth.

Offset networks (``--output offset``) also get, per training and ``--validation-cts`` CT, the head-foot
origin the network gives it against the CT's lung base (found without labels; ``--anchor-z lung-base``
trains on it), and for validation CTs the same on 40 mm slabs of it shown alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from DiffusionSegLib.core.files import atomic_write_json, sha256_of  # noqa: E402
from DiffusionSegLib.pipeline.regions import threshold_lung_mask  # noqa: E402
from DiffusionSegLib.methods.pretrain3d.alignment import (  # noqa: E402
    LEFT_LUNG, RIGHT_LUNG, air_profile, lung_base_levels, lung_extent_mm, lung_halves)
from DiffusionSegLib.methods.pretrain3d.coordinates import (  # noqa: E402
    BACKGROUND, ct_window, load_coordinate_model, organ_consistency, predict_coordinates, save_coordinate_model, smoothness, train_coordinates,
    transfer_labels)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
TRAIN_CTS = {"abdomen_example_ct": DATA / "bench/organs/imagesTr/totalseg_example_ct.nii.gz",
             "chest_aorta_report": DATA / "bench/lung_lesions/imagesTr/synth_chest_r0.nii.gz"}
HELD_OUT = ("abdomen_example_ct_dicom", DATA / "bench/organs/imagesTs/totalseg_example_ct_dicom.nii.gz")
HELD_OUT_LABELS = DATA / "organs_multi/labelsTs/totalseg_example_ct_dicom.nii.gz"
PARTNER = "abdomen_example_ct"  # the training CT compared with the held-out one
PARTNER_LABEL_SLABS = [DATA / f"organs_multi/labelsTr/totalseg_example_ct_{part}.nii.gz"
                       for part in ("below", "validation", "above")]
ORGANS_JSON = DATA / "organs_multi/dataset.json"
UNKNOWN = 255  # label value of voxels no label map covers
LABEL_NOTE = "Organ labels are TotalSegmentator's own predictions (sdist test references), not manual ground truth."


def to_grid(image: sitk.Image, spacing: float, label: bool = False, reference: sitk.Image | None = None) -> sitk.Image:
    """LPS-oriented image resampled to isotropic ``spacing`` (or onto ``reference``'s grid).

    CT: Gaussian anti-aliasing before linear interpolation, air (-1000 HU) outside. Labels: nearest
    neighbour, UNKNOWN outside."""
    image = sitk.DICOMOrient(image, "LPS")
    if reference is None:
        extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
        size = [max(1, int(round(e / spacing))) for e in extent]
        # Keep the physical centre of the field of view: the grid's first voxel centre moves accordingly.
        origin = [o - s / 2 + spacing / 2 for o, s in zip(image.GetOrigin(), image.GetSpacing())]
        reference = sitk.Image(size, sitk.sitkUInt8)
        reference.SetSpacing([spacing] * 3)
        reference.SetOrigin(origin)
    if label:
        return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, UNKNOWN, sitk.sitkUInt8)
    image = sitk.Cast(image, sitk.sitkFloat32)
    sigma = [0.4 * (spacing - s) if spacing > s else 0.0 for s in image.GetSpacing()]
    if max(sigma) > 0:  # the filter works in mm per axis; 0 leaves an axis as it is
        image = sitk.SmoothingRecursiveGaussian(image, [max(s, 1e-3) for s in sigma])
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32)


def scanner_points(image: sitk.Image) -> np.ndarray:
    """(3, D, H, W) LPS positions (mm) of the voxel centres in array axis order (z, y, x)."""
    size = image.GetSize()[::-1]
    spacing, origin = image.GetSpacing()[::-1], image.GetOrigin()[::-1]
    axes = [origin[k] + spacing[k] * np.arange(size[k]) for k in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float64)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """Voxels above -500 HU in the largest connected piece (the body, without the table where separate)."""
    pieces, count = ndimage.label(hu > -500)
    if count == 0:
        return np.zeros(hu.shape, bool)
    return pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)


def partner_labels(ct_4mm: sitk.Image, ct_native: sitk.Image) -> np.ndarray:
    """The training abdomen CT's 11-organ map on the 4 mm grid, reassembled from the organs_multi slabs."""
    native = sitk.DICOMOrient(ct_native, "LPS")
    merged = np.full(sitk.GetArrayViewFromImage(native).shape, UNKNOWN, np.uint8)
    for path in PARTNER_LABEL_SLABS:
        slab = sitk.GetArrayFromImage(to_grid(sitk.ReadImage(str(path)), 0, label=True, reference=native))
        merged = np.where(slab != UNKNOWN, slab, merged)
    merged_image = sitk.GetImageFromArray(merged)
    merged_image.CopyInformation(native)
    return sitk.GetArrayFromImage(to_grid(merged_image, 0, label=True, reference=ct_4mm))


def shifted_labels(labels: np.ndarray, grid: sitk.Image, target: sitk.Image, shift_mm: np.ndarray) -> np.ndarray:
    """``labels`` (on the axis-aligned ``grid``) read at every voxel p of ``target``'s grid at p - shift_mm
    (z, y, x mm), nearest neighbour; 0 outside ``grid``. Both grids LPS-oriented (``to_grid``)."""
    axes = []
    for k, (size, spacing, origin) in enumerate(zip(target.GetSize()[::-1], target.GetSpacing()[::-1],
                                                    target.GetOrigin()[::-1])):
        where = (origin + spacing * np.arange(size) - shift_mm[k] - grid.GetOrigin()[::-1][k]) / grid.GetSpacing()[::-1][k]
        axes.append(np.rint(where).astype(int))
    inside = [(a >= 0) & (a < n) for a, n in zip(axes, labels.shape)]
    clipped = [np.clip(a, 0, n - 1) for a, n in zip(axes, labels.shape)]
    out = labels[np.ix_(*clipped)]
    keep = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    return np.where(keep, out, 0)


def best_translation(labels: np.ndarray, grid: sitk.Image, target_labels: np.ndarray, target: sitk.Image,
                     organs: dict[str, int], start_mm: np.ndarray, reach_mm: tuple[float, float, float] = (240, 40, 40),
                     ) -> tuple[np.ndarray, dict[str, float | None]]:
    """The single translation (searched on the voxel grid around ``start_mm``, z y x) whose label transfer
    ``labels`` -> ``target`` has the highest mean Dice over the organs in both; returns (shift mm, Dice per
    organ). It uses the target's labels: the best ANY translated frame could do, a reference, not a method."""
    step = np.asarray(grid.GetSpacing()[::-1])
    present = {o: v for o, v in organs.items() if (target_labels == v).any() and (labels == v).any()}

    def score(shift: np.ndarray) -> tuple[float, dict[str, float | None]]:
        moved = shifted_labels(labels, grid, target, shift)
        per = {o: dice(moved == v, target_labels == v) for o, v in present.items()}
        return float(np.mean([d or 0.0 for d in per.values()])) if per else 0.0, per

    best = (-1.0, {}, start_mm)
    coarse = [np.arange(-r, r + 1e-6, 2 * s) for r, s in zip(reach_mm, step)]  # every other voxel first
    for dz in coarse[0]:
        for dy in coarse[1]:
            for dx in coarse[2]:
                shift = start_mm + np.array([dz, dy, dx])
                value, per = score(shift)
                if value > best[0]:
                    best = (value, per, shift)
    centre = best[2]
    for offset in np.ndindex(3, 3, 3):  # then the neighbouring voxels of the best
        shift = centre + (np.array(offset) - 1) * step
        value, per = score(shift)
        if value > best[0]:
            best = (value, per, shift)
    return best[2], best[1]


def head_foot_levels(cts: dict[str, np.ndarray], spacing: float) -> dict[str, float]:
    """{name: z (mm from the scan's first slice) of its lung base}, found without labels (NaN: not placed).
    A scan's level depends on the others only through the median lung height used for scans that start
    inside the lungs, and only scans showing both lung ends give that height."""
    return dict(zip(cts, lung_base_levels([air_profile(ct_window(v)) for v in cts.values()], spacing)))


def lung_consistency(validation_cts: dict, train_cts: dict, levels: dict, volumes: dict, grids: dict,
                     coordinates_of, spacing: float) -> dict:
    """Does the same organ land at the same coordinates in a held-out patient and a training patient? Without
    labels: each lung (HU threshold, split at the body's centre) of every validation CT against every training
    CT, over the stretch of lung both show (levels from each scan's own lung base), by organ_consistency:
    distance between the lungs' mean coordinates (learned), against the scanner frame after one body-centroid
    translation (scanner). Prints a table; returns {validation: {training: organ_consistency + range}}."""
    organs = {"right_lung": RIGHT_LUNG, "left_lung": LEFT_LUNG}
    scans = [n for n in [*validation_cts, *train_cts] if not np.isnan(levels[n])]
    # Once per scan: its body, lung mask and the head-foot stretch of its lungs (mm from its lung base).
    bodies = {n: body_mask(volumes[n]) for n in scans}
    masks = {n: threshold_lung_mask(volumes[n], (spacing,) * 3) for n in scans}
    extents = {n: lung_extent_mm(lung_halves(masks[n], spacing, bodies[n]), spacing, levels[n]) for n in scans}
    out: dict = {}
    for held in (n for n in validation_cts if n in scans and extents[n] is not None):
        for other in (n for n in train_cts if n in scans and extents[n] is not None):
            common = (max(extents[held][0], extents[other][0]), min(extents[held][1], extents[other][1]))
            if common[1] - common[0] < 2 * spacing:
                continue
            halves = [lung_halves(masks[n], spacing, bodies[n], common, levels[n]) for n in (held, other)]
            row = organ_consistency(coordinates_of(held), halves[0], coordinates_of(other), halves[1], organs,
                                    scanner_points(grids[held]), scanner_points(grids[other]), bodies[held],
                                    bodies[other])
            out.setdefault(held, {})[other] = {"common_range_mm_above_lung_base": list(common), **row}
    if out:
        print("\nthe same lung in a held-out and a training patient (no labels; mm between the lung's mean positions)")
        for held, rows in out.items():
            for other, row in rows.items():
                cells = "  ".join(f"{n}: learned {fmt(r['learned'])}, scanner {fmt(r['scanner'])}"
                                  for n, r in row["organs"].items())
                print(f"  {held} vs {other} (lung {row['common_range_mm_above_lung_base'][0]:.0f} to "
                      f"{row['common_range_mm_above_lung_base'][1]:.0f} mm above its base): {cells}")
    return out


def frame_origin(coords: np.ndarray, points: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Where the network puts a scan's common origin, in the frame of ``points`` (3, D, H, W) mm: the
    median over body voxels of (position - coordinate), per axis (z, y, x); exact for offset maps."""
    return np.median((points - coords)[:, body], axis=1) if body.any() else np.full(3, np.nan)


def slab_level_errors(net, volume: np.ndarray, level: float, spacing: float, slab_mm: float = 40.0,
                      stride_mm: float = 20.0) -> list[float]:
    """Head-foot error (mm) of the network on slabs of ``volume`` (HU) shown alone, as a short scan (the
    held-out case is a 40 mm slab): each slab's median over its body voxels of (coordinate z - (z - level)),
    ``level`` the scan's lung base (mm from its first slice)."""
    x, body = ct_window(volume), body_mask(volume)
    n, stride = max(1, int(round(slab_mm / spacing))), max(1, int(round(stride_mm / spacing)))
    z = np.arange(volume.shape[0], dtype=np.float64)[:, None, None] * spacing
    errors = []
    for start in range(0, volume.shape[0] - n + 1, stride):
        slab = np.full_like(x, BACKGROUND)
        slab[start:start + n] = x[start:start + n]
        coords = predict_coordinates(net, slab, (spacing,) * 3)
        inside = body.copy()
        inside[:start], inside[start + n:] = False, False
        if inside.any():
            errors.append(float(np.median((coords[0] - (z - level))[inside])))
    return errors


def ct_files(paths: list[Path]) -> dict[str, Path]:
    """{name: file} for CT files given directly or found in folders (NIfTI, NRRD, MHA); name = file stem."""
    found: dict[str, Path] = {}
    for path in paths:
        files = sorted(f for f in path.iterdir() if f.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha"))) \
            if path.is_dir() else [path]
        for f in files:
            found[f.name.split(".")[0]] = f
    if not found:
        raise SystemExit(f"no CT file in {', '.join(map(str, paths))}")
    return found


def shown(path: Path) -> str:
    """The path relative to the repository when it lies inside, else absolute."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / total


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for the model and report.json")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--spacing", type=float, default=6.0, help="isotropic mm")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--output-level", type=int, default=2, help="decoder stops at 1/2^level, then trilinear")
    parser.add_argument("--output", choices=("dense", "offset"), default="dense",
                        help="dense: a decoder predicts every voxel's coordinates; offset: one translation per "
                             "patch added to the voxel positions (rigid by construction, CoordinateNet)")
    parser.add_argument("--max-shift", type=int, default=None,
                        help="voxels between the two crops, per axis (default 8 for dense, a whole patch for offset)")
    parser.add_argument("--consistency-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this coordinate model folder (same network options; fresh lr schedule)")
    parser.add_argument("--evaluate", type=Path, default=None,
                        help="only measure this coordinate model folder (its report goes to -o/report.json)")
    parser.add_argument("--cts", type=Path, nargs="+", default=None,
                        help="training CT files or folders (default: the two above; e.g. data/pretrain_ct from "
                             "scripts/make_pretraining_cts.py). The held-out CT must not be among them")
    parser.add_argument("--anchor-z", choices=("none", "lung-base"), default="none",
                        help="offset only. lung-base: tie the scans' head-foot frames together at the lung base, found "
                             "without labels from each slice's air share (methods/pretrain3d/alignment.py)")
    parser.add_argument("--anchor-weight", type=float, default=1.0)
    parser.add_argument("--slab-probability", type=float, default=0.25,
                        help="share of training views cut down to a slab of 4 to patch/2 slices (a short scan)")
    parser.add_argument("--validation-cts", type=Path, nargs="+", default=[],
                        help="CTs left out of training whose lung-base level (no labels) is compared with the one the network implies: a label-free validation")
    args = parser.parse_args(argv)
    if args.anchor_z != "none" and args.output != "offset":
        parser.error("--anchor-z needs --output offset")
    if args.max_shift is None:
        args.max_shift = args.patch if args.output == "offset" else 8
    train_cts = TRAIN_CTS if args.cts is None else ct_files(args.cts)
    if any(path.resolve() == HELD_OUT[1].resolve() for path in train_cts.values()):
        parser.error(f"the held-out CT {HELD_OUT[1]} is among --cts")
    torch.set_num_threads(1)
    started = time.time()

    validation_cts = ct_files(args.validation_cts) if args.validation_cts else {}
    if set(validation_cts) & set(train_cts):
        parser.error("a --validation-cts CT is also a training CT")
    natives, grids, volumes = {}, {}, {}
    for name, path in {**train_cts, **validation_cts, HELD_OUT[0]: HELD_OUT[1], PARTNER: TRAIN_CTS[PARTNER]}.items():
        natives[name] = sitk.ReadImage(str(path))
        grids[name] = to_grid(natives[name], args.spacing)
        volumes[name] = sitk.GetArrayFromImage(grids[name])
    spacing = (args.spacing,) * 3
    train = [(ct_window(volumes[name]), spacing) for name in train_cts]
    print(f"CTs at {args.spacing} mm: " + ", ".join(f"{n} {v.shape}" for n, v in volumes.items())
          + f" (held out: {HELD_OUT[0]}); prepared in {time.time() - started:.0f} s")

    levels = head_foot_levels({n: volumes[n] for n in [*train_cts, *validation_cts]}, args.spacing)
    print("lung base (mm from each scan's first slice, no labels; nan = not placed): "
          + ", ".join(f"{n} {v:.0f}" for n, v in levels.items()))
    anchors = None
    if args.anchor_z == "lung-base":
        anchors = [[levels[n], np.nan, np.nan] for n in train_cts]

    initial_state, earlier_steps = None, 0
    if args.init is not None:
        earlier, earlier_card = load_coordinate_model(args.init)
        initial_state = earlier.state_dict()
        earlier_steps = int(earlier_card.get("training", {}).get("total_steps", earlier_card.get("training", {}).get("steps", 0)))
    if args.evaluate is not None:  # measure a model trained earlier: no training, nothing rewritten but the report
        net, _ = load_coordinate_model(args.evaluate)
        curve = []
        args.out.mkdir(parents=True, exist_ok=True)
    else:
        t0 = time.time()
        net, log = train_coordinates(train, steps=args.steps, patch=(args.patch,) * 3, batch=args.batch, lr=args.lr,
                                     seed=args.seed, channels=args.channels,
                                     output_level=args.output_level, max_shift=(args.max_shift,) * 3,
                                     consistency_weight=args.consistency_weight, output=args.output,
                                     initial_state=initial_state, anchors=anchors, anchor_weight=args.anchor_weight,
                                     slab_probability=args.slab_probability)
        train_s = time.time() - t0
        window = max(1, len(log) // 10)
        curve = [{"steps": f"{log[i]['step']}-{log[min(i + window, len(log)) - 1]['step']}",
                  **{k: float(np.mean([r.get(k, 0.0) for r in log[i:i + window]]))
                     for k in ("total", "distance", "consistency", "anchor")}}
                 for i in range(0, len(log), window)]
        print(f"trained {args.steps} steps in {train_s:.0f} s; loss (mm), mean per tenth of the run:")
        print("  steps        total  distance  consistency  anchor")
        for row in curve:
            print(f"  {row['steps']:<11} {row['total']:6.1f}  {row['distance']:8.1f}  {row['consistency']:11.1f}"
                  f"  {row['anchor']:6.1f}")

        training_data = [{"name": n, "file": shown(p), "sha256": sha256_of(p)} for n, p in train_cts.items()]
        card = {"training": {"data": training_data, "held_out": shown(HELD_OUT[1]), "steps": args.steps,
                             "continued_from": None if args.init is None else shown(args.init),
                             "total_steps": earlier_steps + args.steps,
                             "batch": args.batch, "lr": args.lr, "seed": args.seed,
                             "output": args.output, "max_shift": args.max_shift,
                             "anchor_z": args.anchor_z, "anchor_weight": args.anchor_weight,
                             "slab_probability": args.slab_probability,
                             "anchors_z_mm": None if anchors is None else
                             {n: (None if np.isnan(a[0]) else a[0]) for n, a in zip(train_cts, anchors)},
                             "consistency_weight": args.consistency_weight, "seconds": round(train_s, 1),
                             "final_loss_mean_last_tenth": curve[-1], "resampling": f"LPS, {args.spacing} mm isotropic",
                             "labels_used": "none"}}
        save_coordinate_model(args.out, net, card)  # before the report: a failing report keeps the model

    predicted: dict[str, np.ndarray] = {}

    def coordinates_of(name: str) -> np.ndarray:
        """The network's coordinates of one scan, computed once (the partner is a training scan too)."""
        if name not in predicted:
            predicted[name] = predict_coordinates(net, ct_window(volumes[name]), spacing)
        return predicted[name]

    coords = {name: coordinates_of(name) for name in (HELD_OUT[0], PARTNER)}
    held, partner = HELD_OUT[0], PARTNER
    head_foot = {}
    if args.output == "offset":  # the network's head-foot origin per scan against its lung base (no labels)
        for name in [*train_cts, *validation_cts]:
            # In the scan's own frame (mm from its first voxel), the frame lung bases are measured in.
            own = scanner_points(grids[name]) - scanner_points(grids[name])[:, :1, :1, :1]
            implied = float(frame_origin(coordinates_of(name), own,
                                         body_mask(volumes[name]))[0])
            head_foot[name] = {"role": "validation" if name in validation_cts else "training",
                               "lung_base_mm": None if np.isnan(levels[name]) else levels[name], "network_mm": implied}
            if name in validation_cts and not np.isnan(levels[name]):
                errors = slab_level_errors(net, volumes[name], levels[name], args.spacing)
                head_foot[name].update(slab_errors_mm=errors, slab_median_abs_error_mm=float(np.median(np.abs(errors))))
            if name in validation_cts:  # smooth on a patient it never saw, not only on the held-out slab
                head_foot[name]["smoothness_body"] = smoothness(coordinates_of(name), spacing, body_mask(volumes[name]))
        print("\nhead-foot origin per scan (mm from its first slice): lung base (no labels) vs the network's")
        for name, row in head_foot.items():
            gap = None if row["lung_base_mm"] is None else row["network_mm"] - row["lung_base_mm"]
            print(f"  {name:<32} {row['role']:<10} lung base {fmt(row['lung_base_mm']):>7}  network {row['network_mm']:7.1f}"
                  f"  gap {fmt(gap):>7}")
            if "slab_errors_mm" in row:
                print(f"    40 mm slabs of it shown alone, every 20 mm from its first slice: head-foot error (mm) "
                      f"{[round(e) for e in row['slab_errors_mm']]}, median |error| {row['slab_median_abs_error_mm']:.0f}")
            if "smoothness_body" in row:
                smooth_row = row["smoothness_body"]
                print(f"    smoothness over its body: {smooth_row['within_20pct']:.3f} of 4 mm steps within 20 %, "
                      f"median ratio {smooth_row['median_ratio']:.3f}, folding {smooth_row['folding']:.3f}")
    lungs = lung_consistency(validation_cts, train_cts, levels, volumes, grids, coordinates_of, args.spacing)
    held_body, partner_body = body_mask(volumes[held]), body_mask(volumes[partner])
    smooth = {"held_out_body": smoothness(coords[held], spacing, held_body),
              "held_out_all": smoothness(coords[held], spacing),
              "training_ct_body": smoothness(coords[partner], spacing, partner_body)}

    names = {int(k): v for k, v in json.loads(ORGANS_JSON.read_text())["labels"].items() if int(k) > 0}
    organs = {v: k for k, v in names.items()}
    held_labels = sitk.GetArrayFromImage(to_grid(sitk.ReadImage(str(HELD_OUT_LABELS)), 0, label=True,
                                                 reference=grids[held]))
    held_labels[held_labels == UNKNOWN] = 0  # the label map covers the CT: outside is only resampling margin
    part_labels = partner_labels(grids[partner], natives[partner])
    known = part_labels != UNKNOWN
    part_for_centroids = np.where(known, part_labels, 0)
    points = {held: scanner_points(grids[held]), partner: scanner_points(grids[partner])}
    consistency = organ_consistency(coords[held], held_labels, coords[partner], part_for_centroids, organs,
                                    points_a=points[held], points_b=points[partner], body_a=held_body,
                                    body_b=partner_body)
    # Label transfer partner -> held-out, by nearest learnt coordinates / by nearest aligned scanner position.
    shift = (points[held].reshape(3, -1)[:, held_body.ravel()].mean(1)
             - points[partner].reshape(3, -1)[:, partner_body.ravel()].mean(1))
    by_coords = transfer_labels(coords[partner], part_labels, coords[held], known)
    by_scanner = transfer_labels(points[partner] + shift[:, None, None, None], part_labels, points[held], known)
    # The reference: the best single translation of the scanner frame, found WITH the held-out labels.
    best_shift, best_dice = best_translation(part_for_centroids, grids[partner], held_labels, grids[held], organs, shift)
    # The translation the coordinates imply between the two CTs: each CT's origin as the network sees it
    # (median over the body of scanner position - coordinate), held-out minus partner; exact for offset maps.
    origins = {name: frame_origin(coords[name], points[name], body)
               for name, body in ((held, held_body), (partner, partner_body))}
    implied_error = origins[held] - origins[partner] - best_shift
    transfer = {}
    for organ, value in organs.items():
        if (held_labels == value).any() and (part_labels == value).any():
            transfer[organ] = {"learned": dice(by_coords == value, held_labels == value),
                               "scanner": dice(by_scanner == value, held_labels == value),
                               "best_translation": best_dice.get(organ)}

    print(f"\nHeld-out CT {held}: smoothness of the coordinates ({args.spacing:g} mm neighbours)")
    print("  region                within 20%  median ratio  isometry error  folding")
    for region, s in smooth.items():
        print(f"  {region:<21} {s['within_20pct']:10.3f}  {s['median_ratio']:12.3f}  {s['isometry_error']:14.3f}"
              f"  {s['folding']:7.3f}")
    print(f"\nOrgans: held-out {held} vs training {partner}. {LABEL_NOTE}")
    print("centroid distance (mm): learned = learnt coordinates, no alignment; scanner = LPS frame after ONE")
    print("translation (body centroids); *_best = after the least-squares translation of all organ centroids")
    print("(uses labels: relative layout only). Dice = labels moved partner -> held-out by nearest coordinate.")
    print("  organ                          vox held  vox train  learned  scanner  learned_best  scanner_best"
          "  Dice learned  Dice scanner  Dice best shift")
    for organ, row in consistency["organs"].items():
        t = transfer.get(organ, {})
        print(f"  {organ:<30} {row['voxels_a']:8d}  {row['voxels_b']:9d}  {fmt(row['learned']):>7}  "
              f"{fmt(row['scanner']):>7}  {fmt(row['learned_best_translation']):>12}  "
              f"{fmt(row['scanner_best_translation']):>12}  {fmt(t.get('learned'), 3):>12}  {fmt(t.get('scanner'), 3):>12}"
              f"  {fmt(t.get('best_translation'), 3):>15}")
    m = consistency["mean"]
    mean_dice = {k: float(np.mean([t[k] or 0.0 for t in transfer.values()])) if transfer else None
                 for k in ("learned", "scanner", "best_translation")}
    print(f"  {'mean (organs in both)':<30} {'':8}  {'':9}  {fmt(m['learned']):>7}  {fmt(m['scanner']):>7}  "
          f"{fmt(m['learned_best_translation']):>12}  {fmt(m['scanner_best_translation']):>12}  "
          f"{fmt(mean_dice['learned'], 3):>12}  {fmt(mean_dice['scanner'], 3):>12}  {fmt(mean_dice['best_translation'], 3):>15}")
    print(f"  best shift: the single translation of the scanner frame with the highest mean Dice, searched with the "
          f"held-out labels (a reference, not a method): {np.round(best_shift - shift, 1).tolist()} mm (z, y, x) "
          "from the body-centroid one")
    print(f"  the learnt frame's implied shift between the two CTs minus the best shift: "
          f"{np.round(implied_error, 1).tolist()} mm (z, y, x)")
    ident, scale = consistency["identified"], consistency["layout_scale"]
    print(f"  organs whose centroid is nearest the same organ's in the other CT: learned {ident['learned']}/{ident['of']},"
          f" scanner {ident['scanner']}/{ident['of']}")
    print(f"  layout scale (learnt / physical distance between organ centroids, 1 = isometric, ~0 = collapsed):"
          f" held-out {fmt(scale['a'], 2)}, training {fmt(scale['b'], 2)}")
    print(f"note: the held-out CT is a {volumes[held].shape[0] * args.spacing:.0f} mm slab, so its organs are partial:"
          " centroids are biased by coverage in both frames alike; label transfer is not.")

    report = {"command": "OMP_NUM_THREADS=1 python scripts/train_coordinate_model.py " + " ".join(sys.argv[1:]),
              "label_note": LABEL_NOTE, "held_out": held, "partner": partner, "shapes": {n: list(v.shape) for n, v in volumes.items()},
              "loss_curve": curve, "smoothness": smooth, "organ_consistency": consistency,
              "label_transfer_dice": transfer, "label_transfer_mean_dice": mean_dice,
              "best_translation_from_body_centroid_mm": (best_shift - shift).tolist(),
              "head_foot_origin": head_foot, "lung_consistency": lungs, "implied_shift_error_mm": implied_error.tolist(),
              "seconds": round(time.time() - started, 1)}
    atomic_write_json(args.out / "report.json", report)
    print(f"\nwrote {args.out}/ (coordinates.safetensors, coordinates.json, report.json) in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
