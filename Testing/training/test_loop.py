"""Training loop (DiffusionSegLib.training.loop): validation Dice, a tiny model that really learns,
seeded reproducibility, and checkpoint/resume."""

import json
from argparse import Namespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import shape_image, train_config, write_shapes
from DiffusionSegLib.training.data import Case
from DiffusionSegLib.core.errors import DiffusionSegError
from DiffusionSegLib.models.card import LabelInfo, ModelCard
from DiffusionSegLib.methods.registry import load_model
from DiffusionSegLib.training.loop import TrainConfig, config_from_cli, dice_score, train, validation_dice

# One torch thread: on the shared 2-core machine, 2 threads under load made 6 tiny steps take 44 s
# instead of 8 s (OpenMP threads wait on each other).
pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_small")
    write_shapes(root, 6, seed=0)
    return root


def _log(model_dir) -> dict:
    return json.loads((model_dir / "training_log.json").read_text())


# ---------------------------------------------------------------------------------------------
# Dice and validation
# ---------------------------------------------------------------------------------------------


def test_dice_score_hand_computed():
    pred = np.zeros((4, 4), bool)
    ref = np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 pixels
    ref[0, 1:] = True  # 3 pixels, 2 shared
    assert dice_score(pred, ref) == pytest.approx(2 * 2 / 6)
    assert dice_score(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0  # both empty
    assert dice_score(pred, np.zeros((4, 4))) == 0.0


class _Oracle(torch.nn.Module):
    """Predicts x0 = the image (the image IS the mask signal), optionally shifted by one pixel."""

    size_divisor = 4

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward(self, x_t, image, t):
        return torch.roll(image, self.shift, dims=-1)


def _oracle_case(spatial_dims: int) -> tuple[Case, ModelCard]:
    shape = (3, 10, 7)  # not multiples of 4: validation must pad and crop back exactly
    mask = np.zeros((2, *shape), np.uint8)
    mask[0, 1, 2:7, 1:5] = 1  # label "b" (channel 1) is empty in this case
    card = ModelCard(name="o", spatial_dims=spatial_dims, in_channels=2, labels=[LabelInfo("a"), LabelInfo("b")],
                     patch_size=[8, 8] if spatial_dims == 2 else [8, 8, 4], prediction_type="sample")
    return Case("c", mask.astype(np.float32) * 2 - 1, mask), card


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_validation_dice_of_an_exact_and_of_a_wrong_denoiser(spatial_dims):
    case, card = _oracle_case(spatial_dims)
    exact = validation_dice(_Oracle(), card, [case], n_samples=2, steps=3, seed=0, device="cpu")
    assert exact["dice"] == {"a": 1.0, "b": 1.0} and exact["mean_dice"] == 1.0
    # Shifted one column: 5 rows x 4 columns, 3 of 4 columns overlap -> Dice = 2*15/40.
    shifted = validation_dice(_Oracle(shift=1), card, [case], n_samples=2, steps=3, seed=0, device="cpu")
    assert shifted["dice"]["a"] == pytest.approx(0.75)
    assert shifted["per_case"]["c"]["b"] == 1.0  # empty and predicted empty


# ---------------------------------------------------------------------------------------------
# A tiny model learns
# ---------------------------------------------------------------------------------------------


def test_tiny_medsegdiff_learns_shapes_and_the_saved_model_segments_new_ones(tmp_path):
    from DiffusionSegLib.pipeline.segment import segment_image
    from DiffusionSegLib.pipeline.settings import SegmentSettings

    write_shapes(tmp_path / "data", 40, seed=0)
    config = train_config(steps=150, batch_size=8, val_every=150, checkpoint_every=150, val_cases=8, val_samples=3,
                     val_steps=5, augment=False, default_steps=5, default_samples=3)
    card = train(tmp_path / "data", tmp_path / "model", config, progress=False)

    # Measured: validation Dice 0.921 after 150 steps (0.908 at 50); 0.901 on the 8 new shapes
    # below; thresholding the pixels at 0.5 gets 0.30 there. About 20 s on one busy CPU thread.
    assert card.metrics["validation_mean_dice"] >= 0.8
    assert card.training["steps"] == 150 and card.training["cases"] == 32
    assert len(card.training["validation_cases"]) == 8 and card.training["duration_s"] > 0
    assert card.training["torch_version"] == torch.__version__
    assert card.labels[0].name == "label_1" and card.patch_size == [32, 32]

    # The saved (EMA) weights, through the inference pipeline, on shapes never seen in training.
    _, loaded = load_model(tmp_path / "model")
    assert loaded.weights_sha256 == card.weights_sha256
    rng = np.random.default_rng(123)
    scores, threshold_scores = [], []
    options = SegmentSettings(crf=False, device="cpu")  # the card's defaults: 3 samples x 5 DDIM steps
    for _ in range(8):
        image, mask = shape_image(rng)
        result = segment_image(sitk.GetImageFromArray(image), tmp_path / "model", options)
        scores.append(dice_score(result.fused[0], mask))
        threshold_scores.append(dice_score(image > 0.5, mask))
    assert np.mean(scores) >= 0.8
    assert np.mean(threshold_scores) < 0.6  # the task is not solved by thresholding pixels


# ---------------------------------------------------------------------------------------------
# Reproducibility, checkpoints, resume
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_losses_other_seed_other_losses(small_dataset, tmp_path):
    cfg = train_config(steps=5, val_every=5, checkpoint_every=5)
    train(small_dataset, tmp_path / "a", cfg, progress=False)
    train(small_dataset, tmp_path / "b", cfg, progress=False)
    train(small_dataset, tmp_path / "c", train_config(steps=5, val_every=5, checkpoint_every=5, seed=1), progress=False)
    a, b, c = (_log(tmp_path / m)["losses"] for m in "abc")
    assert len(a) == 5 and a == b
    assert a != c


def test_resume_continues_bit_identically_from_the_checkpoint(small_dataset, tmp_path):
    from safetensors.torch import load_file

    train(small_dataset, tmp_path / "straight", train_config(steps=6), progress=False)
    first = train(small_dataset, tmp_path / "resumed", train_config(steps=3), progress=False)
    checkpoint = tmp_path / "resumed" / "checkpoint"
    assert {p.name for p in checkpoint.iterdir()} == {"weights.safetensors", "optimizer.pt", "state.json"}
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 3
    assert first.training["steps"] == 3
    assert torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]  # loads without pickle code

    card = train(small_dataset, tmp_path / "resumed", train_config(steps=6), progress=False, resume=True)
    assert card.training["steps"] == 6
    straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "resumed")
    assert len(resumed["losses"]) == 6 and resumed["losses"] == straight["losses"]
    assert [v["step"] for v in resumed["validations"]] == [3, 6]
    weights = [load_file(str(tmp_path / m / "checkpoint" / "weights.safetensors")) for m in ("straight", "resumed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    final = [load_file(str(tmp_path / m / "model.safetensors")) for m in ("straight", "resumed")]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_checkpoint_misuse_is_refused(small_dataset, tmp_path):
    with pytest.raises(DiffusionSegError, match="no checkpoint"):
        train(small_dataset, tmp_path / "m", train_config(steps=3), progress=False, resume=True)
    train(small_dataset, tmp_path / "m", train_config(steps=3), progress=False)
    with pytest.raises(DiffusionSegError, match="already holds a training checkpoint"):
        train(small_dataset, tmp_path / "m", train_config(steps=3), progress=False)
    with pytest.raises(DiffusionSegError, match="different lr"):
        train(small_dataset, tmp_path / "m", train_config(steps=6, lr=5e-4), progress=False, resume=True)


def test_bad_settings_fail_before_training(small_dataset, tmp_path):
    with pytest.raises(DiffusionSegError, match="patch_size"):
        train(small_dataset, tmp_path / "m", train_config(patch_size=[32]), progress=False)
    with pytest.raises(DiffusionSegError, match="multiple of 4"):
        train(small_dataset, tmp_path / "m", train_config(patch_size=[30, 30]), progress=False)
    with pytest.raises(DiffusionSegError, match="val_cases not in the training split: nope"):
        train(small_dataset, tmp_path / "m", train_config(val_cases=["nope"]), progress=False)
    with pytest.raises(DiffusionSegError, match="unknown training setting"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(DiffusionSegError, match="hard_negative_fraction 0.4"):  # 0.67 + 0.4 > 1
        train(small_dataset, tmp_path / "m", train_config(hard_negative_fraction=0.4), progress=False)
    assert not (tmp_path / "m").exists()  # refused before any file is written
    TrainConfig(foreground_fraction=0.5, hard_negative_fraction=0.5).check()


def test_task_weights_are_checked_before_training():
    tasks = {"lung": {"modality": "CT"}, "brain": {"modality": "MR"}}
    TrainConfig(method="unisegdiff", tasks=tasks, task_weights={"lung": 5, "brain": 4}).check()
    for weights, problem in [({"lung": 1.0}, "name every task"), ({"lung": 1, "brain": -1}, "weights >= 0"),
                             ({"lung": 0, "brain": 0}, "at least one > 0")]:
        with pytest.raises(DiffusionSegError, match=problem):
            TrainConfig(method="unisegdiff", tasks=tasks, task_weights=weights).check()
    with pytest.raises(DiffusionSegError, match="without tasks"):
        TrainConfig(task_weights={"lung": 1.0}).check()


def test_config_from_cli_overrides_and_resume_base(small_dataset, tmp_path):
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps({"steps": 10, "method": "vanilla_dpm"}))
    args = Namespace(output=str(tmp_path / "m"), config=str(config_file), resume=False,
                     set=["steps=20", "patch_size=[64, 64]", "method=medsegdiff"])
    cfg = config_from_cli(args)
    assert (cfg.steps, cfg.patch_size, cfg.method, cfg.batch_size) == (20, [64, 64], "medsegdiff", 8)
    # --resume without --config starts from the checkpoint's own settings.
    train(small_dataset, tmp_path / "m", train_config(steps=3), progress=False)
    resumed = config_from_cli(Namespace(output=str(tmp_path / "m"), config=None, resume=True, set=["steps=4"]))
    assert resumed == train_config(steps=4)
    with pytest.raises(DiffusionSegError, match="KEY=VALUE"):
        config_from_cli(Namespace(output=str(tmp_path / "x"), config=None, resume=False, set=["steps"]))


def test_the_crf_default_written_to_the_card_is_checked_before_training():
    TrainConfig(default_crf="published").check()
    TrainConfig(default_crf=False).check()
    with pytest.raises(DiffusionSegError, match="default_crf 'bilateral'"):
        TrainConfig(default_crf="bilateral").check()
