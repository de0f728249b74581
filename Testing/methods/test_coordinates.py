"""Anatomical coordinate model (issue 15, methods/pretrain3d/coordinates.py): network shapes, the
self-supervised loss against values computed by hand, seeded training, the evaluation measures and the
safetensors round trip. Tiny sizes: patch 16^3, channels (4, 8)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from DiffusionSegLib.methods.pretrain3d.coordinates import (
    BACKGROUND, CARD_FILE, WEIGHTS_FILE, CoordinateNet, coordinate_loss, ct_window, grid_points, load_coordinate_model,
    keep_slab, offset_consistency, organ_consistency, predict_coordinates, save_coordinate_model, smoothness, train_coordinates, transfer_labels)
from helpers import blob_phantom

# Mean distance over the 28 pairs of corners of a unit cube: 12 edges, 12 face and 4 body diagonals.
CUBE_MEAN = (12 * 1.0 + 12 * math.sqrt(2.0) + 4 * math.sqrt(3.0)) / 28


def test_network_shapes_and_size_check():
    net = CoordinateNet(channels=(4, 8))
    assert net(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 3, 16, 16, 16)
    with pytest.raises(ValueError, match="multiple of 2"):
        net(torch.zeros(1, 1, 16, 16, 15))
    coarse = CoordinateNet(channels=(4, 8, 8), output_level=1)  # decoder stops at 1/2, then trilinear
    assert coarse(torch.zeros(1, 1, 8, 16, 12)).shape == (1, 3, 8, 16, 12) and len(coarse.decoder) == 1
    # Sliding windows cover a volume of any size, smaller than the patch along one axis too.
    out = predict_coordinates(net.eval(), np.zeros((10, 20, 13), np.float32), patch=(16, 16, 16))
    assert out.shape == (3, 10, 20, 13) and out.dtype == np.float32


def test_ct_window_maps_the_window_to_minus_one_one():
    assert ct_window(np.array([-3000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0])).tolist() == [-1, -1, 0, 0.5, 1, 1]


def test_loss_is_zero_for_the_physical_positions_themselves():
    p = grid_points((2, 2, 2), (1.0, 1.0, 1.0))[None]
    losses = coordinate_loss(p, p, p, p, pairs=None, samples=None)
    assert losses["distance"].item() == 0 and losses["consistency"].item() == 0 and losses["total"].item() == 0


def test_distance_term_by_hand_for_scaled_and_constant_outputs():
    p = grid_points((2, 2, 2), (1.0, 1.0, 1.0))[None]
    # Outputs 3p: every pair distance is 3d, so the error is 2d: twice the cube's mean pair distance.
    scaled = coordinate_loss(3 * p, 3 * p, p, p, pairs=None, samples=None)
    assert scaled["distance"].item() == pytest.approx(2 * CUBE_MEAN, rel=1e-6)
    assert scaled["consistency"].item() == pytest.approx(0.0, abs=1e-6)
    # Constant outputs (collapse) pay the whole mean distance, and nothing in consistency.
    const = torch.full_like(p, 7.0)
    collapsed = coordinate_loss(const, const, p, p, pairs=None, samples=None)
    assert collapsed["distance"].item() == pytest.approx(CUBE_MEAN, rel=1e-6)
    assert collapsed["consistency"].item() == 0
    # Two different constants in the two views: consistency = their distance, sqrt(3) here.
    apart = coordinate_loss(const, const + 1.0, p, p, pairs=None, samples=None, consistency_weight=2.0)
    assert apart["consistency"].item() == pytest.approx(math.sqrt(3.0), rel=1e-6)
    assert apart["total"].item() == pytest.approx(CUBE_MEAN + 2 * math.sqrt(3.0), rel=1e-6)


def test_position_in_the_patch_pays_the_crop_shift():
    """Two overlapping crops of one scan (grid 2 x 1 x 1 mm): scan positions cost nothing; positions
    counted from each crop's corner are a perfect isometry but pay the shift between the crops."""
    scan = grid_points((6, 6, 6), (2.0, 1.0, 1.0))
    a, b = scan[:, 0:4, 1:5, 0:4][None], scan[:, 2:6, 0:4, 1:5][None]  # b is a moved by (2, -1, 1) voxels
    anchored = coordinate_loss(a, b, a, b, pairs=None, samples=None)
    assert anchored["distance"].item() == 0 and anchored["consistency"].item() == 0
    in_patch = coordinate_loss(a - a[:, :, :1, :1, :1], b - b[:, :, :1, :1, :1], a, b, pairs=None, samples=None)
    assert in_patch["distance"].item() == pytest.approx(0.0, abs=1e-5)
    assert in_patch["consistency"].item() == pytest.approx(math.sqrt(4.0 ** 2 + 1 + 1), rel=1e-6)
    # A view translated by (3, 4, 0) mm: consistency 5 mm on every shared voxel.
    moved = coordinate_loss(a, b + torch.tensor([3.0, 4.0, 0.0]).view(1, 3, 1, 1, 1), a, b, pairs=None, samples=None)
    assert moved["consistency"].item() == pytest.approx(5.0, rel=1e-6)


def test_padding_voxels_are_left_out_of_the_loss():
    p = grid_points((2, 2, 4), (1.0, 1.0, 1.0))[None]
    valid = torch.zeros(1, 2, 2, 4, dtype=torch.bool)
    valid[..., :2] = True  # the last two x-columns are padding
    garbage = p.clone()
    garbage[..., 2:] = 1000.0
    losses = coordinate_loss(garbage, garbage, p, p, valid, valid, pairs=None, samples=None)
    assert losses["distance"].item() == 0 and losses["consistency"].item() == 0
    # View a whole and right, view b padded there: only b's valid voxels are compared.
    one_sided = coordinate_loss(p, garbage, p, p, None, valid, pairs=None, samples=None)
    assert one_sided["consistency"].item() == 0


def test_keep_slab_blanks_the_slices_outside():
    image = np.arange(5 * 2 * 2, dtype=np.float32).reshape(5, 2, 2)
    valid = np.ones((5, 2, 2), bool)
    valid[4] = False  # already padding
    slab, kept = keep_slab(image, valid, 2, 3)
    assert kept[:, 0, 0].tolist() == [False, False, True, True, False]
    assert (slab[:2] == BACKGROUND).all() and (slab[2:] == image[2:]).all()  # padding stays as it was
    assert keep_slab(image, valid, -2, 3)[1][:, 0, 0].tolist() == [True, False, False, False, False]


def fixed_loss(net: CoordinateNet, volume: np.ndarray, spacing: float) -> float:
    """The loss on fixed crop pairs and pair draws (the same for every network compared)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)
    starts = [((0, 0, 0), (6, 4, 2)), ((8, 8, 8), (3, 7, 1)), ((4, 0, 8), (0, 6, 4))]
    xa, xb, pa, pb = [], [], [], []
    for sa, sb in starts:
        for start, xs, ps in ((sa, xa, pa), (sb, xb, pb)):
            xs.append(volume[tuple(slice(s, s + 16) for s in start)])
            ps.append(grid_points((16, 16, 16), (spacing,) * 3, [s * spacing for s in start]))
    with torch.no_grad():
        ca = net(torch.from_numpy(np.stack(xa)[:, None]))
        cb = net(torch.from_numpy(np.stack(xb)[:, None]))
        return coordinate_loss(ca, cb, torch.stack(pa), torch.stack(pb), pairs=2000, samples=2000,
                               generator=generator)["total"].item()


def test_training_lowers_the_loss_and_is_repeatable():
    volume = blob_phantom()
    settings = dict(steps=30, patch=(16, 16, 16), batch=2, lr=3e-3, channels=(4, 8), pairs=256, samples=256)
    start, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], **{**settings, "steps": 0}, seed=1)
    net, log = train_coordinates([(volume, (4.0, 4.0, 4.0))], **settings, seed=1)
    again, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], **settings, seed=1)
    other, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], **settings, seed=2)
    assert len(log) == 30 and {"step", "total", "distance", "consistency"} <= set(log[0])
    before, after = fixed_loss(start, volume, 4.0), fixed_loss(net, volume, 4.0)
    assert after < 0.7 * before, (before, after)
    for (name, w), w_again in zip(net.state_dict().items(), again.state_dict().values()):
        assert torch.equal(w, w_again), name
    assert any(not torch.equal(w, w_other) for w, w_other in zip(net.state_dict().values(), other.state_dict().values()))
    assert net.trained_spacing == (4.0, 4.0, 4.0) and net.trained_patch == (16, 16, 16)
    with pytest.raises(ValueError, match="resample"):
        predict_coordinates(net, volume, spacing=(3.0, 3.0, 3.0))


def test_smoothness_of_exact_scaled_and_mirrored_maps():
    p = grid_points((4, 5, 6), (2.0, 1.0, 3.0)).numpy()
    exact = smoothness(p, (2.0, 1.0, 3.0))
    assert exact == pytest.approx({"within_20pct": 1.0, "median_ratio": 1.0, "isometry_error": 0.0, "folding": 0.0},
                                  abs=1e-6)
    doubled = smoothness(2 * p, (2.0, 1.0, 3.0))
    # J = 2I: ratio 2, J^T J - I = 3I, Frobenius norm 3 sqrt(3).
    assert doubled["within_20pct"] == 0.0 and doubled["median_ratio"] == pytest.approx(2.0)
    assert doubled["isometry_error"] == pytest.approx(3 * math.sqrt(3.0))
    mirrored = p * np.array([1.0, -1.0, 1.0])[:, None, None, None]
    assert smoothness(mirrored, (2.0, 1.0, 3.0))["isometry_error"] == pytest.approx(0.0, abs=1e-6)
    folded = p.copy()
    folded[2, :, :, 3:] = 2 * 3.0 * 3 - folded[2, :, :, 3:]  # x runs backwards past x = 9 mm: a fold
    assert smoothness(folded, (2.0, 1.0, 3.0))["folding"] == pytest.approx(2 / 5)  # 2 of the 5 x-steps


def test_organ_consistency_by_hand():
    """Scan b is scan a on a table moved by T = (10, 0, 0) mm; organ 2 also moved by (0, 0, 2) voxels
    of 2 mm. Learnt coordinates = the scanner positions, so they carry T; the scanner frame after the
    body-centroid translation does not. Centroids (mm): a: one (3, 3, 3), two (7, 7, 5);
    b: one (13, 3, 3), two (17, 7, 9)."""
    shape = (6, 6, 10)
    points_a = grid_points(shape, (2.0, 2.0, 2.0)).numpy()
    points_b = points_a + np.array([10.0, 0.0, 0.0])[:, None, None, None]
    labels_a = np.zeros(shape, np.uint8)
    labels_a[1:3, 1:3, 1:3] = 1
    labels_a[3:5, 3:5, 2:4] = 2
    labels_b = np.zeros(shape, np.uint8)
    labels_b[1:3, 1:3, 1:3] = 1
    labels_b[3:5, 3:5, 4:6] = 2
    result = organ_consistency(points_a, labels_a, points_b, labels_b, {"one": 1, "two": 2, "absent": 3},
                               points_a=points_a, points_b=points_b)
    one, two = result["organs"]["one"], result["organs"]["two"]
    assert one["learned"] == pytest.approx(10.0) and one["scanner"] == pytest.approx(0.0, abs=1e-9)
    assert two["learned"] == pytest.approx(math.hypot(10.0, 4.0)) and two["scanner"] == pytest.approx(4.0)
    # Best single translation: (-10, 0, -2) mm; residuals 2 mm for each organ.
    assert one["learned_best_translation"] == pytest.approx(2.0) and two["scanner_best_translation"] == pytest.approx(2.0)
    assert one["voxels_a"] == 8 and two["voxels_b"] == 8
    assert result["organs"]["absent"]["learned"] is None
    assert result["mean"]["learned"] == pytest.approx((10.0 + math.hypot(10.0, 4.0)) / 2)
    assert result["mean"]["scanner"] == pytest.approx(2.0)
    # Learnt: a's organ two (7, 7, 5) is nearer b's organ one (13, 3, 3): 7.5 mm, than b's two: 10.8 mm.
    assert (one["identified_learned"], two["identified_learned"]) == (True, False)
    assert (one["identified_scanner"], two["identified_scanner"]) == (True, True)  # 4 mm vs 6 mm
    assert result["identified"] == {"learned": 1, "scanner": 2, "of": 2}
    assert result["layout_scale"] == pytest.approx({"a": 1.0, "b": 1.0})
    halved = organ_consistency(0.5 * points_a, labels_a, points_b, labels_b, {"one": 1, "two": 2},
                               points_a=points_a, points_b=points_b)
    assert halved["layout_scale"] == pytest.approx({"a": 0.5, "b": 1.0})
    # A body mask moves the centroid used for the scanner alignment: only the masked voxels count.
    body_b = np.zeros(shape, bool)
    body_b[:, :, :5] = True  # centroid x index 2 instead of 4.5: 5 mm further down x
    shifted = organ_consistency(points_a, labels_a, points_b, labels_b, {"one": 1}, points_a=points_a,
                                points_b=points_b, body_b=body_b)
    assert shifted["organs"]["one"]["scanner"] == pytest.approx(5.0)


def test_transfer_labels_by_nearest_coordinates():
    source = grid_points((2, 2, 3), (1.0, 1.0, 1.0)).numpy()
    labels = np.arange(12).reshape(2, 2, 3)
    target = source[:, :, :, ::-1] + 0.1  # the same grid read backwards along x, slightly off
    assert transfer_labels(source, labels, target).tolist() == labels[:, :, ::-1].tolist()
    known = np.ones((2, 2, 3), bool)
    known[..., 0] = False  # column x = 0 unknown: its targets take the x = 1 labels
    assert transfer_labels(source, labels, target, known)[..., 2].tolist() == labels[..., 1].tolist()


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(3)
    net = CoordinateNet(channels=(4, 8)).eval()
    net.trained_spacing, net.trained_patch = (4.0, 4.0, 4.0), (16, 16, 16)
    save_coordinate_model(tmp_path, net, {"steps": 7, "training_data": ["phantom"]})
    raw = (tmp_path / WEIGHTS_FILE).read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header])  # a safetensors header, not a pickle
    card = json.loads((tmp_path / CARD_FILE).read_text())
    assert card["network"] == {"in_channels": 1, "channels": [4, 8], "norm_groups": 4, "output_scale_mm": 100.0,
                               "output_level": 0}
    assert card["patch"] == [16, 16, 16] and card["spacing_mm"] == [4.0, 4.0, 4.0] and card["steps"] == 7
    assert card["normalization"]["background"] == BACKGROUND
    loaded, loaded_card = load_coordinate_model(tmp_path)
    assert loaded_card == card and loaded.trained_patch == (16, 16, 16)
    x = torch.from_numpy(blob_phantom((16, 16, 16))[None, None])
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))


def test_offset_network_is_rigid_by_construction_and_round_trips(tmp_path):
    torch.manual_seed(4)
    net = CoordinateNet(channels=(4, 8), output="offset", spacing_mm=(4.0, 2.0, 3.0)).eval()
    x = torch.from_numpy(np.stack([blob_phantom((16, 16, 16)), -blob_phantom((16, 16, 16))])[:, None])
    with torch.no_grad():
        coords, t = net(x), net.translation(x)
    assert coords.shape == (2, 3, 16, 16, 16) and t.shape == (2, 3)
    # Every voxel = its position from the patch centre (z, y, x mm) + the patch's translation.
    for n in range(2):
        local = coords[n] - t[n][:, None, None, None]
        assert local[:, 0, 0, 0].tolist() == pytest.approx([-7.5 * 4.0, -7.5 * 2.0, -7.5 * 3.0], abs=1e-4)
        assert local[:, 15, 15, 15].tolist() == pytest.approx([7.5 * 4.0, 7.5 * 2.0, 7.5 * 3.0], abs=1e-4)
    # So distances between outputs are the physical ones: the distance term is 0 for any weights.
    p = grid_points((16, 16, 16), (4.0, 2.0, 3.0))[None].expand(2, -1, -1, -1, -1)
    assert coordinate_loss(coords, coords, p, p, pairs=500)["distance"].item() == pytest.approx(0.0, abs=1e-3)
    assert not torch.allclose(t[0], t[1])  # the translation depends on the content
    with pytest.raises(ValueError, match="spacing_mm"):
        CoordinateNet(channels=(4, 8), output="offset")
    with pytest.raises(ValueError, match="offset"):
        CoordinateNet(channels=(4, 8)).translation(x)
    net.trained_spacing, net.trained_patch = (4.0, 2.0, 3.0), (16, 16, 16)
    save_coordinate_model(tmp_path, net)
    loaded, card = load_coordinate_model(tmp_path)
    assert card["network"]["output"] == "offset" and card["network"]["spacing_mm"] == [4.0, 2.0, 3.0]
    with torch.no_grad():
        assert torch.equal(loaded(x), coords)


def test_offset_consistency_by_hand():
    # View a centred at (10, 0, 0) says t = (1, 2, 2); view b centred at (0, 0, 0) says t = (-9, 2, 2):
    # both put the scan's origin at (-9, 2, 2), so they agree.
    ta, tb = torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[-9.0, 2.0, 2.0]])
    ca, cb = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    assert offset_consistency(ta, tb, ca, cb).item() == 0.0
    # b says (-9, 5, 6) instead: off by (0, 3, 4), 5 mm; a batch of the two pairs averages 0 and 5.
    tb2 = torch.tensor([[-9.0, 5.0, 6.0]])
    assert offset_consistency(ta, tb2, ca, cb).item() == pytest.approx(5.0)
    assert offset_consistency(torch.cat([ta, ta]), torch.cat([tb, tb2]), torch.cat([ca, ca]),
                              torch.cat([cb, cb])).item() == pytest.approx(2.5)


def test_offset_training_learns_where_a_patch_lies():
    """A phantom whose content says where a patch is: after training, patches at different places of it
    agree on where its origin lies far better than the untrained network (whose translations ignore the
    patch position, so it is off by the whole shift)."""
    volume = blob_phantom((24, 24, 24))
    settings = dict(patch=(16, 16, 16), batch=4, lr=3e-3, channels=(4, 8, 16), output="offset", slab_probability=0.0)
    start, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=0, seed=1, **settings)
    net, log = train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=150, seed=1, **settings)
    assert net.output == "offset" and log[0]["distance"] == 0.0

    def origin_spread(model: CoordinateNet) -> float:
        """Mean distance (mm) of each patch's estimate of the volume origin from their mean, 8 corner patches."""
        starts = [(z, y, x) for z in (0, 8) for y in (0, 8) for x in (0, 8)]
        patches = torch.from_numpy(np.stack([volume[z:z + 16, y:y + 16, x:x + 16] for z, y, x in starts])[:, None])
        centres = torch.tensor(starts, dtype=torch.float32) * 4.0 + 7.5 * 4.0
        with torch.no_grad():
            origins = model.translation(patches) - centres
        return torch.linalg.vector_norm(origins - origins.mean(0), dim=1).mean().item()

    before, after = origin_spread(start), origin_spread(net)
    assert before > 20.0 and after < 0.5 * before, (before, after)


def test_training_continues_from_an_initial_state():
    volume = blob_phantom((16, 16, 16))
    settings = dict(patch=(16, 16, 16), batch=1, channels=(4, 8), output="offset")
    first, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=3, seed=1, **settings)
    kept, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=0, seed=2, initial_state=first.state_dict(), **settings)
    fresh, _ = train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=0, seed=2, **settings)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), kept.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(RuntimeError):  # another architecture's weights are refused
        train_coordinates([(volume, (4.0, 4.0, 4.0))], steps=0, initial_state=first.state_dict(), patch=(16, 16, 16),
                          batch=1, channels=(4, 8))
