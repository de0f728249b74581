"""Metrics against hand-computed cases."""

import numpy as np
import pytest

from DiffusionSegLib.training.metrics import dice, hd95, iou


def test_dice_and_iou_hand_computed():
    a = np.zeros((4, 4), np.uint8)
    b = np.zeros((4, 4), np.uint8)
    a[0, 0:3] = 1  # 3 voxels
    b[0, 1:4] = 1  # 3 voxels, overlap 2
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert iou(a, b) == pytest.approx(2 / 4)


def test_empty_masks_agree_perfectly():
    z = np.zeros((3, 3), np.uint8)
    assert dice(z, z) == 1.0 and iou(z, z) == 1.0
    one = z.copy()
    one[1, 1] = 1
    assert dice(one, z) == 0.0 and hd95(one, z, (1.0, 1.0)) is None


def test_hd95_uses_spacing():
    a = np.zeros((1, 5, 5), np.uint8)
    b = np.zeros((1, 5, 5), np.uint8)
    a[0, 2, 1] = 1
    b[0, 2, 3] = 1  # two voxels apart along x
    assert hd95(a, b, (3.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(a, b, (3.0, 1.0, 2.5)) == pytest.approx(5.0)


def test_false_positive_components_hand_computed():
    from DiffusionSegLib.training.metrics import false_positive_components

    ref = np.zeros((4, 10, 10), bool)
    ref[1:3, 1:4, 1:4] = True
    pred = np.zeros_like(ref)
    pred[1:3, 2:5, 2:5] = True  # overlaps the reference: not a false positive
    pred[0, 8:10, 8:10] = True  # 4 voxels, separate
    pred[3, 0, 9] = True  # 1 voxel, separate
    assert false_positive_components(pred, ref, voxel_ml=0.5) == [2.0, 0.5]
    assert false_positive_components(np.zeros_like(ref), ref, 1.0) == []


def test_precision_and_recall_against_hand_counts():
    from DiffusionSegLib.training.metrics import precision, recall

    ref = np.zeros((4, 4), bool)
    ref[:2, :2] = True  # 4 voxels
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 voxels, 4 of them right
    assert precision(pred, ref) == pytest.approx(4 / 6) and recall(pred, ref) == pytest.approx(1.0)
    empty = np.zeros((4, 4), bool)
    assert precision(empty, ref) == 0.0 and recall(empty, ref) == 0.0  # a missed lesion
    assert precision(empty, empty) == 1.0 and recall(empty, empty) == 1.0  # a correct "nothing"
    assert precision(pred, empty) == 0.0 and recall(pred, empty) == 0.0  # a false alarm
