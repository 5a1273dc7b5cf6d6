"""Evaluation noise drawn on the device: Philox-4x32-10 in tensor operations (``mtkit.ops.philox``) against the
published known-answer vectors, and the noise of an image independent of its batch, its device and the
evaluation's host."""

from __future__ import annotations

import pytest
import torch

from mtkit.ops.philox import image_keys, normal, philox4x32, random_words, uniform
from mtkit.perturbations import AttackContext, Gaussian, SaltPepper

# Random123's kat_vectors (Salmon et al., SC 2011): philox4x32 with 10 rounds, counter, key -> output
KAT = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
       ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
       ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox4x32_10_gives_the_known_answers(counter, key, expected):
    assert tuple(philox4x32(torch.tensor(counter), torch.tensor(key)).tolist()) == expected
    assert tuple(philox4x32(torch.tensor(counter), key).tolist()) == expected  # a key of two Python ints


def test_the_words_are_uniform_and_the_normals_normal():
    words = random_words(image_keys(0, [3], "cpu", "check"), 400_000)
    assert words.min() >= 0 and words.max() < 2**32
    u, z = uniform(words), normal(words)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.003
    assert abs(float(z.mean())) < 0.005 and abs(float(z.std()) - 1) < 0.005
    assert abs(float((z.abs() < 1.96).double().mean()) - 0.95) < 0.002  # the normal's 95 % interval


def test_an_image_noise_does_not_depend_on_its_batch():
    """Batch 4 against batches 1 + 3, for Gaussian noise and salt and pepper: equal bit for bit."""
    x = torch.rand(4, 3, 16, 24) * 255
    for pert in (Gaussian(), SaltPepper()):
        whole = pert.sweep(AttackContext(torch.nn.Identity(), None, torch.Generator(), 7, [10, 11, 12, 13]), x,
                           None, [2.0])[2.0]
        first = pert.sweep(AttackContext(torch.nn.Identity(), None, torch.Generator(), 7, [10]), x[:1], None,
                           [2.0])[2.0]
        rest = pert.sweep(AttackContext(torch.nn.Identity(), None, torch.Generator(), 7, [11, 12, 13]), x[1:],
                          None, [2.0])[2.0]
        assert torch.equal(whole, torch.cat([first, rest])), type(pert).__name__


def test_noise_is_drawn_on_the_device_without_the_host():
    """On the meta stand-in (``tests/test_device_discipline.py``) the draws of Gaussian noise and salt and pepper
    copy nothing from the CPU: the keys come from the images' indices made on the device, the words from Philox."""
    from test_device_discipline import HostCopies

    x = torch.zeros(2, 3, 16, 24, device="meta")
    ctx = AttackContext(torch.nn.Identity(), None, torch.Generator(), 0, [4, 5])
    with HostCopies() as spy:
        g = Gaussian().sweep(ctx, x, None, [1.0, 4.0])
        s = SaltPepper().sweep(ctx, x, None, [1.0])
    assert spy.copies == [] and g[4.0].device.type == "meta" and s[1.0].shape == x.shape
