"""3D volumes, and slices of 2D models with ``slice_windows``, larger than the training crop go through the
network in crop-sized, blended windows."""

from __future__ import annotations

import torch

from DiffusionSegLib.methods.registry import get_method
from DiffusionSegLib.methods.windows import WindowGrid, in_windows, needs_windows, window_starts
from DiffusionSegLib.models.card import LabelInfo, ModelCard


def card_3d(method: str, patch=(8, 8, 8)) -> ModelCard:
    network = {"medsegdiff": {"channels": [8, 16], "norm_groups": 4},
               "unet": {"channels": [8, 16], "num_res_units": 1}}[method]
    return ModelCard(name="w", method=method, spatial_dims=3, in_channels=1, labels=[LabelInfo("a")],
                     network=network, patch_size=list(patch), default_samples=2, default_steps=2)


def test_only_items_larger_than_the_window_are_windowed():
    assert needs_windows((12, 8, 8), (8, 8, 8)) and not needs_windows((8, 8, 8), (8, 8, 8))
    assert needs_windows((64, 40), (32, 32)) and not needs_windows((32, 32), (32, 32))
    assert not needs_windows((12, 8, 8), None)


def test_3d_cards_always_use_windows_and_2d_cards_only_with_slice_windows():
    assert card_3d("medsegdiff", patch=(16, 24, 8)).inference_window() == (8, 16, 24)
    flat = ModelCard(name="f", spatial_dims=2, patch_size=[32, 48])
    assert flat.inference_window() is None  # 2D models see whole slices unless the card says otherwise
    assert ModelCard(name="f", spatial_dims=2, patch_size=[32, 48], slice_windows=True).inference_window() == (32, 48)
    assert ModelCard(name="f", spatial_dims=2, slice_windows=True).inference_window() is None  # no crop known


def test_a_card_with_a_malformed_slice_windows_is_refused_when_read():
    import dataclasses

    import pytest

    from DiffusionSegLib.core.errors import ModelLoadError

    data = dataclasses.asdict(ModelCard(name="f", spatial_dims=2, patch_size=[32, 32]))
    assert ModelCard.from_dict({**data, "slice_windows": True}).slice_windows is True
    for bad in ("yes", 1, None):
        with pytest.raises(ModelLoadError, match="slice_windows"):
            ModelCard.from_dict({**data, "slice_windows": bad})
        with pytest.raises(ModelLoadError, match="slice_windows"):
            ModelCard.from_dict({**data, "tasks": {"lung": {"slice_windows": bad}}, "default_task": "lung"})


def test_a_task_may_set_its_own_slice_windows():
    card = ModelCard(name="f", spatial_dims=2, patch_size=[32, 32], default_task="lung",
                     tasks={"lung": {"slice_windows": True}, "liver": {}})
    assert card.for_task("lung").inference_window() == (32, 32)
    assert card.for_task("liver").inference_window() is None


def test_window_starts_by_hand():
    assert window_starts(100, 64, 0.5) == [0, 32, 36]  # steps of 32; the last window flush with the end
    assert window_starts(128, 64, 0.5) == [0, 32, 64]
    assert window_starts(100, 64, 0.25) == [0, 36]  # steps of 48, then flush
    assert window_starts(64, 64, 0.5) == [0] and window_starts(40, 64, 0.5) == [0]


def test_a_window_grid_splits_item_major_and_merges_back_exactly():
    grid = WindowGrid.of((100, 40), (64, 64), 0.5)
    assert grid.window == (64, 40)  # clipped to the item along the short axis
    assert grid.corners == ((0, 0), (32, 0), (36, 0)) and grid.count == 3
    items = torch.randn(2, 3, 100, 40)
    windows = grid.split(items)
    assert windows.shape == (6, 3, 64, 40)
    assert torch.equal(windows[4], items[1, :, 32:96])  # row b * K + k: window k of item b
    assert grid.rows(torch.tensor([1, 0])).tolist() == [3, 4, 5, 0, 1, 2]
    torch.testing.assert_close(grid.merge(windows), items)  # a weighted mean of equal values
    weight = grid.weight()
    assert weight.shape == (64, 40) and float(weight.min()) > 0
    assert float(weight[31:33, 19:21].mean()) > float(weight[0, 0]) * 100  # the centre counts most


def test_a_blend_of_different_windows_weights_each_window_by_its_gaussian():
    grid = WindowGrid.of((6,), (4,), 0.5)  # windows [0, 4) and [2, 6)
    merged = grid.merge(torch.tensor([[[1.0, 1.0, 1.0, 1.0]], [[3.0, 3.0, 3.0, 3.0]]]))
    w = grid.weight()
    expected = torch.tensor([1.0, 1.0, (w[2] + 3 * w[0]) / (w[2] + w[0]), (w[3] + 3 * w[1]) / (w[3] + w[1]), 3.0, 3.0])
    torch.testing.assert_close(merged[0, 0], expected)


def test_a_2d_diffusion_model_with_slice_windows_samples_a_large_slice_in_windows():
    card = ModelCard(name="w", method="medsegdiff", spatial_dims=2, in_channels=1, labels=[LabelInfo("a")],
                     network={"channels": [8, 16], "norm_groups": 4}, patch_size=[16, 16], default_samples=2,
                     default_steps=2, slice_windows=True)
    method = get_method("medsegdiff")
    torch.manual_seed(0)
    net = method.build_network(card).eval()
    seen = []
    original = net.forward

    def recording(x, image, t, **kwargs):
        seen.append(tuple(x.shape[2:]))
        return original(x, image, t, **kwargs)

    net.forward = recording
    out = method.sample(net, card, torch.randn(2, 1, 24, 40), method.plan(card, None, None, None), seed=1)
    assert out.shape == (2, 2, 1, 24, 40)
    assert seen and set(seen) == {(16, 16)}


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
