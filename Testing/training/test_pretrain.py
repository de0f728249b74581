"""The pretraining loop of the 3D backbone (training/pretrain.py): learning, checkpoint and resume,
and ``torchrun`` with 2 CPU processes giving the run of one process with the same global batch
(equal draws; weights equal up to float rounding, as in test_distributed.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import REPO, write_body_ct
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.methods.pretrain3d.coordinates import CoordinateNet
from DiffusionSegLib.methods.pretrain3d.denoising import PretrainConfig, PretrainObjective, load_backbone
from DiffusionSegLib.training import pretrain
from DiffusionSegLib.training.pretrain import pretrain_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHT_RMS = 1e-5  # 1% of one Adam step at lr 1e-3 (see test_distributed.py)


def _volumes(n: int = 2, shape=(20, 24, 28)) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    return [np.clip(0.8 * np.exp(-((x - 0.2 * k) ** 2 + y ** 2 + z ** 2) * 3) - 0.4
                    + 0.05 * rng.standard_normal(shape), -1, 1).astype(np.float32) for k in range(n)]


def test_missing_guidance_and_a_batch_that_does_not_split_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="coordinate model"):
        pretrain_backbone(_volumes(), PretrainConfig(objective=PretrainObjective(coordinate_weight=1.0), steps=1),
                          tmp_path)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    with pytest.raises(DiffusionSegError, match="batch_size 3 cannot be split evenly over 2 processes"):
        pretrain_backbone(_volumes(), PretrainConfig(batch=3, steps=1), tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_pretraining_learns_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """On two small synthetic volumes: 6 steps in one go, or a run stopped after its step-4 checkpoint
    and started again, give the same weights and log; the saved backbone loads back and a foreign config is refused."""
    volumes = _volumes()
    coords = CoordinateNet(channels=(4, 8), norm_groups=2).eval()
    objective = PretrainObjective(kind="diffusion", coordinate_weight=0.5)
    config = PretrainConfig(objective=objective, channels=(8, 16), patch=(8, 8, 8), batch=2, steps=6,
                            lr=3e-3, checkpoint_every=2)
    whole, log = pretrain_backbone(volumes, config, tmp_path / "whole", coords)
    assert [r["step"] for r in log] == list(range(1, 7)) and all(r["coordinates"] > 0 for r in log)

    real_save = pretrain._save_checkpoint

    def save_then_die(folder, config, net, optimiser, rng, generator, log):
        real_save(folder, config, net, optimiser, rng, generator, log)
        if len(log) == 4:
            raise KeyboardInterrupt  # the session ends after the step-4 checkpoint

    monkeypatch.setattr(pretrain, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(volumes, config, tmp_path / "split", coords)
    monkeypatch.undo()
    assert not (tmp_path / "split" / "backbone.json").exists()  # nothing final before the run is done
    resumed, resumed_log = pretrain_backbone(volumes, config, tmp_path / "split", coords)
    assert resumed_log == log
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    loaded, card = load_backbone(tmp_path / "whole")
    assert card["pretraining"]["objective"]["coordinate_weight"] == 0.5 and card["network"]["coordinate_head"]
    for a, b in zip(whole.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another configuration"):
        pretrain_backbone(volumes, PretrainConfig(**{**config.__dict__, "lr": 1e-3}), tmp_path / "whole", coords)


def test_denoising_loss_falls_over_training(tmp_path):
    config = PretrainConfig(objective=PretrainObjective(kind="restorative"), channels=(8, 16), patch=(8, 8, 8),
                            batch=4, steps=60, lr=3e-3, checkpoint_every=1000)
    _, log = pretrain_backbone(_volumes(), config, tmp_path)
    first, last = np.mean([r["image"] for r in log[:10]]), np.mean([r["image"] for r in log[-10:]])
    assert last < 0.5 * first


# 16 channels: with 8 (one channel per GroupNorm group) a conv bias before a norm has no effect, its
# gradient is 0 up to rounding, and Adam turns that rounding into a visible step (test_distributed.py).
TINY = ["--steps", "3", "--patch", "8", "--channels", "16", "32", "--batch", "4", "--checkpoint-every", "3",
        "--spacing", "4", "--device", "cpu", "--lr", "1e-3"]


def test_two_processes_pretrain_as_one_process_with_the_same_global_batch(tmp_path):
    """``torchrun --nproc_per_node=2 -m DiffusionSegLib pretrain`` against the same command in one process."""
    from safetensors.torch import load_file

    from DiffusionSegLib.cli.main import main

    cts = tmp_path / "cts"
    cts.mkdir()
    write_body_ct(cts / "a.nii.gz", texture_seed=0)
    write_body_ct(cts / "b.nii.gz", flip=True, texture_seed=1)
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["pretrain", str(cts), "-o", str(one), *TINY]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "DiffusionSegLib", "pretrain", str(cts), "-o", str(two), *TINY],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count('"final_loss"') == 1  # rank 0 alone reports

    logs = [json.loads((m / "pretraining_log.json").read_text())["losses"] for m in (one, two)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):
        assert b["total"] == pytest.approx(a["total"], rel=1e-5)
    states = [json.loads((m / "checkpoint" / "state.json").read_text()) for m in (one, two)]
    assert states[0]["rng"] == states[1]["rng"]  # every rank drew the whole global batch of crops
    a, b = (load_file(str(m / "checkpoint" / "weights.safetensors")) for m in (one, two))
    assert torch.equal(a["rng.loss"], b["rng.loss"])  # the same timesteps and noise were drawn
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a if k.startswith("net.")])
    assert diff.pow(2).mean().sqrt().item() <= WEIGHT_RMS
    _, card = load_backbone(two)
    assert card["processes"] == 2 and card["pretraining"]["batch"] == 4


def _write_3d_organ_dataset(root) -> None:
    """3 small CTs (a soft-tissue body in air, a brighter 'organ' inside) with the organ as label 1."""
    import SimpleITK as sitk

    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        hu = np.full((16, 16, 16), -1000.0)
        hu[2:14, 2:14, 2:14] = 40.0 + rng.normal(0, 10, (12, 12, 12))
        organ = np.zeros(hu.shape, np.uint8)
        organ[5:11, 4 + i:10 + i, 5:11] = 1
        hu[organ == 1] += 100.0
        for sub, array in (("imagesTr", hu.astype(np.int16)), ("labelsTr", organ)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((4.0, 4.0, 4.0))
            sitk.WriteImage(image, str(root / sub / f"c{i}.nii.gz"))


def test_a_3d_medsegdiff_starts_from_a_pretrained_backbone(tmp_path):
    """``pretrained_backbone``: the image encoder starts from the backbone's weights (lr 0 keeps them, so the
    written model holds them exactly) and the card says so; another CT window is refused before training."""
    from safetensors.torch import load_file

    from DiffusionSegLib.methods.pretrain3d.denoising import DenoisingBackbone, save_backbone
    from DiffusionSegLib.training.loop import TrainConfig, train

    data = tmp_path / "data"
    _write_3d_organ_dataset(data)
    torch.manual_seed(3)
    backbone = DenoisingBackbone((8, 16), norm_groups=4)
    save_backbone(tmp_path / "backbone", backbone, PretrainConfig(channels=(8, 16)), {"spacing_mm": [4.0] * 3})
    base = dict(method="medsegdiff", spatial_dims=3, network={"channels": [8, 16, 32], "norm_groups": 4},
                patch_size=[8, 8, 8], spacing=[4.0, 4.0, 4.0], batch_size=2, lr=0.0, steps=1, val_every=1,
                checkpoint_every=1, val_cases=1, val_samples=1, val_steps=1, seed=0, device="cpu",
                normalization={"kind": "ct_window", "center": 0, "width": 2000},
                pretrained_backbone=str(tmp_path / "backbone"))
    card = train(data, tmp_path / "model", TrainConfig(**base), progress=False)
    record = card.training["pretrained_backbone"]
    assert record["objective"]["kind"] == "diffusion" and record["parameters_set"] > 10
    weights = load_file(str(tmp_path / "model" / "model.safetensors"))
    for key, value in backbone.state_dict().items():
        if key.startswith(("stem.", "encoder.0.", "downs.0.")):
            mapped = key.replace("stem.", "image_encoder.stem.", 1).replace("encoder.0.", "image_encoder.stages.0.", 1)
            mapped = mapped.replace("downs.0.", "image_encoder.downs.0.", 1)
            assert torch.equal(weights[mapped], value), key

    with pytest.raises(DiffusionSegError, match="-1000..1000 HU"):
        train(data, tmp_path / "soft", TrainConfig(**{**base, "normalization": {"kind": "ct_window", "center": 50,
                                                                                  "width": 400}}), progress=False)
    assert not (tmp_path / "soft").exists()
    with pytest.raises(DiffusionSegError, match="2D model"):
        TrainConfig(**{**base, "spatial_dims": 2, "patch_size": [8, 8]}).check()
