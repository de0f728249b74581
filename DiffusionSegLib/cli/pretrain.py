"""``diffusionseg pretrain``: pretrain a 3D backbone on unlabelled CT volumes (issue 15).

Every CT is turned to LPS axes, resampled to an isotropic grid (``--spacing`` mm) and scaled from
-1000..1000 HU to [-1, 1]; random crops train ``methods.pretrain3d.denoising.DenoisingBackbone``
with the diffusion (denoising) or the restorative objective, optionally guided by an anatomical
coordinate model. The run checkpoints every ``--checkpoint-every`` steps; the same command resumes.
Under ``torchrun --nproc_per_node=N -m DiffusionSegLib pretrain ...`` N processes share the global
``--batch`` (``training/pretrain.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from DiffusionSegLib.pipeline.settings import int_at_least
from DiffusionSegLib.core.errors import DiffusionSegError

log = logging.getLogger("diffusionseg")

_CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def add_parser(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("pretrain", help="pretrain a 3D backbone on unlabelled CT volumes (denoising diffusion)",
                       description="Pretrain a 3D backbone on unlabelled CT volumes (LPS axes, isotropic grid, "
                                   "-1000..1000 HU to [-1, 1]); the same command resumes from the last checkpoint.")
    p.add_argument("inputs", nargs="+", help="CT volumes, or folders of them (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("-o", "--output", required=True, help="folder for the backbone, its card and the checkpoint")
    p.add_argument("--objective", choices=("diffusion", "restorative"), default="diffusion",
                   help="diffusion: predict the noise at a random level t (default); restorative: predict the "
                        "clean crop from one fixed corruption (the baseline)")
    p.add_argument("--coordinates", default=None,
                   help="anatomical coordinate model folder (scripts/train_coordinate_model.py): adds the "
                        "coordinate head, weighted by --coordinate-weight")
    p.add_argument("--coordinate-weight", type=float, default=1.0, help="weight of the coordinate loss")
    p.add_argument("--spacing", type=float, default=None,
                   help="isotropic mm (default: the coordinate model's, else 4)")
    p.add_argument("--steps", type=int_at_least(1), default=1000, help="optimiser steps")
    p.add_argument("--patch", type=int_at_least(4), default=32, help="crop edge in voxels (multiple of 4)")
    p.add_argument("--batch", type=int_at_least(1), default=2, help="crops per step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to a tenth)")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64], help="widths, one per resolution level")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same weights on CPU)")
    p.add_argument("--checkpoint-every", type=int_at_least(1), default=100,
                   help="steps between checkpoints (the same command resumes from the last)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA, then MPS, else CPU), cpu, cuda, cuda:N or mps; under torchrun each "
                        "process takes its own GPU")
    p.set_defaults(func=run)


def ct_files(inputs: list[str]) -> list[Path]:
    """The CT files named or found (one level) in the folders named, sorted; refuses none."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(f for f in item.iterdir() if f.name.endswith(_CT_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise DiffusionSegError(f"no such file or folder: {item}")
    if not files:
        raise DiffusionSegError("no CT volume found in the inputs")
    return files


def isotropic_ct(path: Path, spacing: float):
    """(D, H, W) float32 in [-1, 1]: the CT in LPS axes on an isotropic ``spacing`` mm grid."""
    import numpy as np
    import SimpleITK as sitk

    from DiffusionSegLib.methods.registry import pretraining
    from DiffusionSegLib.pipeline.io import read_image

    image = read_image(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DiffusionSegError(f"{path}: a 3D scalar CT volume is needed")
    grid = to_isotropic(image, spacing)
    return pretraining().coordinates.ct_window(np.asarray(sitk.GetArrayFromImage(grid)))


def to_isotropic(image, spacing: float, labels: bool = False):
    """A 3D image in LPS axes on an isotropic ``spacing`` mm grid with the same origin: CT values
    smoothed then linearly interpolated (air outside), or a label map by nearest neighbour."""
    import SimpleITK as sitk

    image = sitk.DICOMOrient(image if labels else sitk.Cast(image, sitk.sitkFloat32), "LPS")
    size = [max(1, int(round(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    # Smooth before going coarser, so the grid does not alias fine structure.
    sigma = [max(0.0, (spacing - s) / 2.0) for s in image.GetSpacing()]
    if not labels:
        for axis, s in enumerate(sigma):  # axis by axis: one already as coarse as the grid stays unsmoothed
            if s > 0:
                smooth = sitk.RecursiveGaussianImageFilter()
                smooth.SetDirection(axis)
                smooth.SetSigma(s)
                image = smooth.Execute(image)
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkNearestNeighbor if labels else sitk.sitkLinear,
                         image.GetOrigin(), [spacing] * 3, image.GetDirection(), 0 if labels else -1000.0,
                         image.GetPixelID() if labels else sitk.sitkFloat32)


def run(args: argparse.Namespace) -> int:
    from DiffusionSegLib.core.files import atomic_write_json
    from DiffusionSegLib.methods.registry import pretraining
    from DiffusionSegLib.training import distributed
    from DiffusionSegLib.training.pretrain import pretrain_backbone

    parts = pretraining()
    load_coordinate_model = parts.coordinates.load_coordinate_model
    PretrainConfig, PretrainObjective = parts.denoising.PretrainConfig, parts.denoising.PretrainObjective

    if args.patch % 2 ** (len(args.channels) - 1):
        raise DiffusionSegError(f"--patch {args.patch} must be a multiple of {2 ** (len(args.channels) - 1)} "
                                f"for {len(args.channels)} levels")
    coordinate_net, spacing = None, args.spacing
    if args.coordinates:
        try:
            coordinate_net, card = load_coordinate_model(args.coordinates)
        except (OSError, ValueError, KeyError) as err:
            raise DiffusionSegError(f"cannot read the coordinate model {args.coordinates}: {err}") from None
        try:
            spacing = parts.coordinates.grid_spacing(card, spacing)
        except ValueError as err:
            raise DiffusionSegError(str(err)) from None
    spacing = spacing or 4.0
    files = ct_files(args.inputs)  # every file is read and checked before training starts
    volumes = [isotropic_ct(f, spacing) for f in files]
    objective = PretrainObjective(kind=args.objective,
                                  coordinate_weight=args.coordinate_weight if coordinate_net is not None else 0.0)
    config = PretrainConfig(objective=objective, channels=tuple(args.channels), patch=(args.patch,) * 3,
                            batch=args.batch, steps=args.steps, lr=args.lr, seed=args.seed,
                            checkpoint_every=args.checkpoint_every)
    try:
        _, losses = pretrain_backbone(volumes, config, args.output, coordinate_net, device=args.device,
                                      card_extra={"spacing_mm": [spacing] * 3})
    except ValueError as err:
        raise DiffusionSegError(str(err)) from None
    if not distributed.is_main():  # under torchrun rank 0 alone writes and reports
        return 0
    atomic_write_json(Path(args.output) / "pretraining_log.json", {
        "inputs": [str(f) for f in files], "spacing_mm": spacing, "shapes": [list(v.shape) for v in volumes],
        "coordinates": args.coordinates, "losses": losses})
    last = losses[-1] if losses else {}
    print(json.dumps({"output": str(args.output), "steps": last.get("step", 0), "final_loss": last}))
    return 0
