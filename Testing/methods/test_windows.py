"""3D volumes larger than the training crop go through the network in crop-sized, blended windows."""

from __future__ import annotations

import torch

from DiffusionSegLib.methods.registry import get_method
from DiffusionSegLib.methods.windows import in_windows, needs_windows
from DiffusionSegLib.models.card import LabelInfo, ModelCard


def card_3d(method: str, patch=(8, 8, 8)) -> ModelCard:
    network = {"medsegdiff": {"channels": [8, 16], "norm_groups": 4},
               "unet": {"channels": [8, 16], "num_res_units": 1}}[method]
    return ModelCard(name="w", method=method, spatial_dims=3, in_channels=1, labels=[LabelInfo("a")],
                     network=network, patch_size=list(patch), default_samples=2, default_steps=2)


def test_only_3d_items_larger_than_the_window_are_windowed():
    assert needs_windows((12, 8, 8), (8, 8, 8)) and not needs_windows((8, 8, 8), (8, 8, 8))
    assert not needs_windows((64, 64), (32, 32))  # 2D models see whole slices
    assert not needs_windows((12, 8, 8), None)


def test_patch_shape_is_in_the_networks_axis_order():
    assert card_3d("medsegdiff", patch=(16, 24, 8)).patch_shape() == (8, 16, 24)  # (H, W, D) -> (D, H, W)


def test_windows_cover_the_volume_and_agree_with_one_call_for_a_position_independent_network():
    calls = []

    def predict(patch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(patch.shape))
        return patch[:, :1] * 2.0  # depends on each voxel only: windows must reproduce it exactly

    volume = torch.randn(3, 2, 12, 20, 9)
    out = in_windows(predict, volume, (8, 8, 8), windows_per_call=4)
    assert out.shape == (3, 1, 12, 20, 9)
    assert all(shape[2:] == (8, 8, 8) and shape[0] <= 4 for shape in calls)
    torch.testing.assert_close(out, volume[:, :1] * 2.0, rtol=1e-5, atol=1e-5)
    calls.clear()
    small = torch.randn(2, 2, 8, 8, 8)
    assert torch.equal(in_windows(predict, small, (8, 8, 8), 4), small[:, :1] * 2.0) and len(calls) == 1


def test_less_overlap_means_fewer_windows_with_the_same_coverage():
    """The card's ``window_overlap``: 0.25 steps 6 voxels through an 8-voxel window, 0.5 steps 4."""
    calls = {0.5: 0, 0.25: 0}
    volume = torch.randn(1, 2, 20, 20, 20)
    for overlap in calls:
        def predict(patch: torch.Tensor, overlap=overlap) -> torch.Tensor:
            calls[overlap] += patch.shape[0]
            return patch[:, :1] * 2.0

        out = in_windows(predict, volume, (8, 8, 8), windows_per_call=64, overlap=overlap)
        torch.testing.assert_close(out, volume[:, :1] * 2.0, rtol=1e-5, atol=1e-5)
    # window starts 0, 4, 8, 12 per axis (stride 4) against 0, 6, 12 (stride 6): 64 windows against 27
    assert calls == {0.5: 4 ** 3, 0.25: 3 ** 3}


def test_a_card_with_an_impossible_window_overlap_is_refused_when_read():
    import dataclasses

    import pytest

    from DiffusionSegLib.core.errors import ModelLoadError

    data = dataclasses.asdict(card_3d("medsegdiff"))
    assert ModelCard.from_dict({**data, "window_overlap": 0.25}).windows_overlap() == 0.25
    for bad in (1.0, -0.1, "half", True):
        with pytest.raises(ModelLoadError, match="window_overlap"):
            ModelCard.from_dict({**data, "window_overlap": bad})


def test_a_3d_diffusion_model_samples_a_volume_larger_than_its_crop_in_windows():
    card = card_3d("medsegdiff")
    method = get_method("medsegdiff")
    torch.manual_seed(0)
    net = method.build_network(card).eval()
    seen = []
    original = net.forward

    def recording(x, image, t):
        seen.append(tuple(x.shape[2:]))
        return original(x, image, t)

    net.forward = recording
    volume = torch.randn(1, 1, 16, 16, 24)
    plan = method.plan(card, None, None, None)
    first = method.sample(net, card, volume, plan, seed=5)
    assert first.shape == (2, 1, 1, 16, 16, 24) and first.dtype == torch.uint8
    assert seen and set(seen) == {(8, 8, 8)}  # never the whole volume
    again = method.sample(net, card, volume, plan, seed=5, batch_size=1)
    assert torch.equal(first, again)


def test_a_3d_supervised_model_predicts_a_large_volume_in_windows():
    card = card_3d("unet")
    method = get_method("unet")
    torch.manual_seed(0)
    net = method.build_network(card).eval()
    volume = torch.randn(1, 1, 16, 12, 20)
    out = method.sample(net, card, volume, method.plan(card, None, None, None))
    assert out.shape == (1, 1, 1, 16, 12, 20)
