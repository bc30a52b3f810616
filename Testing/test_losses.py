"""LNCC in fp32: bounded by construction, equal to a brute-force reference, robust to bad images."""
import numpy as np
import torch

from LiquidRegLib import losses


def brute_force_lncc(a, b, window, eps=1e-6):
    """Direct windowed NCC over in-image voxels (independent of the cumulative-sum code)."""
    a = (a - a.mean()) / a.std(ddof=1)
    b = (b - b.mean()) / b.std(ddof=1)
    r = window // 2
    out = np.zeros_like(a)
    for i, j, k in np.ndindex(a.shape):
        sl = tuple(slice(max(c - r, 0), c + r + 1) for c in (i, j, k))
        wa, wb = a[sl].ravel(), b[sl].ravel()
        cov = (wa * wb).mean() - wa.mean() * wb.mean()
        va = max((wa * wa).mean() - wa.mean() ** 2, 0.0)
        vb = max((wb * wb).mean() - wb.mean() ** 2, 0.0)
        out[i, j, k] = cov / np.sqrt(va * vb + eps)
    return out


def test_lncc_matches_brute_force():
    rng = np.random.default_rng(0)
    a = rng.random((9, 10, 11))
    b = 0.5 * a + rng.random((9, 10, 11))
    ours = losses.local_ncc(torch.tensor(a)[None, None].float(), torch.tensor(b)[None, None].float(), 5)
    np.testing.assert_allclose(ours[0, 0].numpy(), brute_force_lncc(a, b, 5), atol=2e-4)


def test_lncc_bounded_and_finite_on_adversarial_images():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 1, 24, 24, 24, generator=g)
    spike = base.clone()
    spike[0, 0, 12, 12, 12] = 1e6
    cases = [(base, base), (base, -base), (base, torch.zeros_like(base)),
             (torch.ones_like(base), torch.ones_like(base)), (spike, base), (base * 1e4, base * 1e-4)]
    for a, b in cases:
        cc = losses.local_ncc(a, b, 9)
        assert torch.isfinite(cc).all()
        assert cc.min() >= -1.0 and cc.max() <= 1.0
    assert losses.local_ncc(base, base, 9).min() > 0.99
    assert losses.local_ncc(base, -base, 9).max() < -0.99


def test_lncc_is_computed_in_fp32_under_autocast():
    a = torch.rand(1, 1, 16, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cc = losses.local_ncc(a, a.bfloat16(), 5)
    assert cc.dtype == torch.float32


def test_dice_and_folding_losses():
    labels = torch.zeros(1, 2, 8, 8, 8)
    labels[:, 0, :4] = 1
    labels[:, 1, 4:] = 1
    assert losses.dice_loss(labels, labels) < 1e-6
    assert losses.dice_loss(labels, labels.flip(1)) > 0.99
    assert losses.folding_loss(torch.ones(1, 1, 4, 4, 4)) == 0
    assert losses.folding_loss(-torch.ones(1, 1, 4, 4, 4)) > 0


# ---- contrast-free similarity (instance optimisation of any pair) --------------------------------
def smooth_volume(seed, shape=(28, 32, 30)):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *shape, generator=g), 5, 1, 2)
    return (x - x.min()) / (x.max() - x.min())


REMAPPINGS = {  # monotone, strongly non-linear changes of contrast
    "gamma": lambda x: 3.0 * x.pow(2.5) + 7.0,
    "inverted": lambda x: 5.0 - 3.0 * x.pow(0.4),   # as T2 against T1: dark becomes bright
}


def dissimilarities(name, fixed, moving, shifts=range(4)):
    """Dissimilarity of ``fixed`` and ``moving`` shifted by 0..3 voxels."""
    from LiquidRegLib import train

    values = []
    for s in shifts:
        disp = torch.zeros(1, 3, *fixed.shape[2:])
        disp[:, 0] = float(s)
        values.append(float(train.similarity_loss(name, {"fixed": fixed, "moving": moving}, disp)))
    return np.array(values)


def test_instance_similarity_ignores_a_monotone_remapping_of_one_image():
    """MIND-SSC (Accurate mode's similarity across contrasts) scores a pair the same when one image's intensities
    are remapped by a monotone, non-linear function, increasing or decreasing: over misalignments
    of 0-3 voxels its curve keeps its minimum at the alignment and its values to 15 % of its
    range.  LNCC, the check's control, loses its minimum when the contrast is inverted."""
    image = smooth_volume(0)
    base = dissimilarities("mind", image, image)
    for name, remap in REMAPPINGS.items():
        other = dissimilarities("mind", image, remap(image))
        assert np.argmin(other) == 0 and np.all(np.diff(other) > 0), (name, other)
        assert np.abs(other - base).max() < 0.15 * (base[-1] - base[0]), (name, base, other)
    lncc = dissimilarities("lncc", image, REMAPPINGS["inverted"](image))
    assert np.argmin(lncc) != 0, lncc


def test_mind_is_exactly_invariant_to_an_affine_change_of_intensities_even_an_inverted_one():
    image = smooth_volume(1)
    reference = losses.mind_ssc(image)
    for a, b in ((2.0, 5.0), (-1.0, 1.0), (1e-3, 0.0), (1e4, -3.0)):
        assert torch.allclose(losses.mind_ssc(a * image + b), reference, atol=2e-3), (a, b)


def test_mind_is_bounded_and_finite_on_adversarial_images():
    base = smooth_volume(2, (20, 20, 20))
    spike = base.clone()
    spike[0, 0, 10, 10, 10] = 1e6
    for image in (base, torch.zeros_like(base), torch.ones_like(base), spike, base * 1e-8):
        descriptors = losses.mind_ssc(image)
        assert descriptors.shape == (1, 12, 20, 20, 20)
        assert torch.isfinite(descriptors).all()
        assert descriptors.min() >= 0 and descriptors.max() <= 1
    flat = losses.mind_ssc(torch.ones_like(base))
    assert torch.equal(flat, torch.ones_like(flat))  # no structure: every pair equally similar
    assert float(losses.descriptor_loss(losses.mind_ssc(base), losses.mind_ssc(base))) == 0.0


def test_contrast_free_similarities_are_computed_in_fp32_under_autocast():
    a = smooth_volume(3, (16, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert losses.mind_ssc(a.bfloat16()).dtype == torch.float32
        assert losses.ngf_loss(a, a.bfloat16()).dtype == torch.float32
        assert losses.descriptor_loss(a.bfloat16(), a).dtype == torch.float32


def test_auto_similarity_takes_lncc_within_a_contrast_and_mind_across_contrasts():
    """Accurate mode's automatic choice: the contrast agreement (the images' correlation inside
    the head after the network) is high for two images of one contrast, even when one image's
    intensities are remapped non-linearly, and negative for an inverted one."""
    from LiquidRegLib import train

    fixed = smooth_volume(4)
    moving = torch.roll(fixed, 1, dims=2)
    still = torch.zeros(1, 3, *fixed.shape[2:])
    same = train.contrast_agreement(fixed, REMAPPINGS["gamma"](moving), still)
    crossed = train.contrast_agreement(fixed, REMAPPINGS["inverted"](moving), still)
    assert same >= train.SAME_CONTRAST_AGREEMENT > crossed, (same, crossed)
    assert crossed < 0


def test_tissue_threshold_splits_two_intensity_classes_between_them():
    """Otsu's threshold (what the contrast agreement keeps of the fixed image) lies between two
    classes of intensity, whatever their sizes."""
    from LiquidRegLib import train

    for dark_share in (0.2, 0.5, 0.8):
        image = torch.full((1, 1, 20, 20, 20), 0.7)
        image.view(-1)[: int(dark_share * image.numel())] = 0.1
        image += 0.02 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0))
        image = image.clamp(0, 1)
        threshold = train.tissue_threshold(image)
        assert image[image < 0.4].max() < threshold < image[image > 0.4].min(), dark_share
