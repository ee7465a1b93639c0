"""Image filters and image-sentence assignment, against hand-computed expectations."""

from __future__ import annotations

import pytest

from flamingo_cli.data.assign import assign_images, large_enough

SIM = [
    # sentences: 0     1     2
    [0.30, 0.28, 0.10],  # image 0
    [0.31, 0.05, 0.12],  # image 1
    [0.10, 0.26, 0.20],  # image 2
    [0.20, 0.21, 0.23],  # image 3
]


def test_size_filter_boundary() -> None:
    assert not large_enough(10_999)
    assert large_enough(11_000)
    assert not large_enough(0)


def test_argmax_lets_images_share_a_sentence() -> None:
    pairs = assign_images(SIM, [True] * 4, threshold=0.24, method="argmax")
    # image 3's best (0.23) is under the threshold
    assert pairs == [(0, 0), (1, 0), (2, 1)]


def test_hungarian_is_one_to_one_and_maximises_the_total() -> None:
    # three sentences take three of the four images: 1->0 + 0->1 + 3->2 = 0.31 + 0.28 + 0.23
    # = 0.82 beats, e.g., 0->0 + 2->1 + 3->2 = 0.79; image 2 is left out.
    pairs = assign_images(SIM, [True] * 4, threshold=0.0, method="hungarian")
    assert pairs == [(0, 1), (1, 0), (3, 2)]
    # the threshold then drops 3->2 (0.23 < 0.24)
    assert assign_images(SIM, [True] * 4, threshold=0.24, method="hungarian") == [(0, 1), (1, 0)]


def test_ineligible_images_do_not_take_part() -> None:
    eligible = [False, True, True, False]
    assert assign_images(SIM, eligible, 0.24, "hungarian") == [(1, 0), (2, 1)]
    assert assign_images(SIM, eligible, 0.24, "argmax") == [(1, 0), (2, 1)]
    assert assign_images(SIM, [False] * 4, 0.24, "argmax") == []


def test_threshold_is_inclusive() -> None:
    assert assign_images([[0.24]], [True], 0.24, "argmax") == [(0, 0)]
    assert assign_images([[0.24]], [True], 0.24, "hungarian") == [(0, 0)]


def test_matrix_shape_must_cover_every_image() -> None:
    with pytest.raises(ValueError, match="one row per image"):
        assign_images([[0.3, 0.2]], [True, True], 0.24, "argmax")
