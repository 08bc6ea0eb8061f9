"""Maps and scores (eq. 9, 10, 12): similarity softmax, eq. 10, the Gaussian blur, eq. 12."""

from __future__ import annotations

import torch

from kanoclip.modeling.maps import combine_maps, gaussian_blur, global_score, similarity_probabilities


def test_similarity_probabilities_prefer_the_closer_text():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normal along x, abnormal along y
    patches = torch.tensor([[[1.0, 0.1], [0.1, 1.0]]])
    probs = similarity_probabilities(patches, text, temperature=0.07)
    assert probs.shape == (1, 2, 2)
    assert probs[0, 0, 0] > 0.99 and probs[0, 1, 1] > 0.99


def test_combine_maps_is_eq_10():
    normal = torch.rand(2, 20, 20)
    abnormal = torch.rand(2, 20, 20)
    torch.testing.assert_close(combine_maps(normal, abnormal, sigma=0), (abnormal + 1 - normal) / 2)
    smoothed = combine_maps(normal, abnormal, sigma=2)
    assert smoothed.shape == (2, 20, 20)
    assert smoothed.std() < ((abnormal + 1 - normal) / 2).std()


def test_gaussian_blur_preserves_constants_and_mass_center():
    const = torch.full((1, 30, 30), 0.3)
    torch.testing.assert_close(gaussian_blur(const, 3.0), const)
    spike = torch.zeros(1, 31, 31)
    spike[0, 15, 15] = 1.0
    blurred = gaussian_blur(spike, 2.0)
    assert blurred[0].argmax() == 15 * 31 + 15
    assert abs(float(blurred.sum()) - 1.0) < 1e-4


def test_global_score_is_eq_12_halved():
    feature = torch.tensor([[0.0, 1.0]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    amap = torch.zeros(1, 4, 4)
    amap[0, 1, 2] = 0.8
    p_abnormal = torch.softmax(torch.tensor([0.0, 1.0]) / 0.07, dim=0)[1]
    torch.testing.assert_close(global_score(feature, text, amap, 0.07), ((p_abnormal + 0.8) / 2).view(1))
