"""Training from image-level labels through the loop: resume, best-by-validation-loss, calibration."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from DiffusionSegLib.bench.synthetic_skin import write_skin_dataset
from DiffusionSegLib.training.loop import TrainConfig, train


def config(**kwargs) -> TrainConfig:
    base = dict(method="diffseg", network={"channels": [8, 16], "norm_num_groups": 4}, patch_size=[32, 32],
                normalization={"kind": "rgb"}, modality="RGB", batch_size=4, lr=1e-3, steps=4, val_every=2,
                checkpoint_every=2, augment=True, seed=0, method_settings={"train_t_max": 300, "noise_levels": [60, 150]})
    return TrainConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def skin(tmp_path_factory):
    return write_skin_dataset(tmp_path_factory.mktemp("skin") / "data", n_lesion=5, n_healthy=5, size=32, seed=2)


def test_an_image_label_run_resumes_bit_identically_and_keeps_its_calibration(skin, tmp_path):
    straight = train(skin, tmp_path / "straight", config(), progress=False)
    train(skin, tmp_path / "resumed", config(steps=2), progress=False)
    resumed = train(skin, tmp_path / "resumed", config(), progress=False, resume=True)
    logs = [json.loads((tmp_path / m / "training_log.json").read_text()) for m in ("straight", "resumed")]
    assert logs[0]["losses"] == logs[1]["losses"] and len(logs[0]["losses"]) == 4
    assert [v["step"] for v in logs[1]["validations"]] == [2, 4]
    weights = [load_file(str(tmp_path / m / "model.safetensors")) for m in ("straight", "resumed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert straight.method_settings["healthy_thresholds"] == resumed.method_settings["healthy_thresholds"]
    # the kept weights are those of the lowest held-out loss
    best = min(logs[0]["validations"], key=lambda v: v["validation_loss"])
    assert straight.metrics["validation"]["step"] == best["step"]
    assert straight.metrics["validation_loss"] == pytest.approx(best["validation_loss"], abs=1e-6)
