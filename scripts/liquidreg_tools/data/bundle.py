"""The training bundle: every training anatomy, affinely aligned to one reference, on one 2 mm grid,
in a single small file that travels to a GPU machine (which has no network) with the code.

Registration runs after the affine stage, so the network only ever sees pairs that are already
affinely aligned.  Aligning the training anatomies once, with the same :func:`affine_register`
that ``register`` uses, makes training pairs look like what the network meets, and lets the
sampler draw pairs of *different* subjects without a per-pair affine.

The bundle holds labels (shared scheme, int16), the real T1 where a subject has one (uint8), the
grid, each subject's label levels and reliable labels, the affine used, and the provenance of the
source files.  Held-out benchmark subjects (:data:`subjects.TEST_SUBJECTS`) never enter it.
"""
from __future__ import annotations

import io as _io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from LiquidRegLib.grid import Grid, resample
from LiquidRegLib.preprocess import normalise_intensity
from . import labels as L
from .fetch import load_subject, read_manifest
from .subjects import TEST_SUBJECTS

#: The reference every anatomy is aligned to (a training subject with a real T1).
REFERENCE = "fsaverage"
#: Training anatomy kept out of training for model selection (see scripts/train.py).
VALIDATION_SUBJECTS = ("donor_14380",)
#: 2 mm grid around the reference brain; a brain (about 140 x 175 x 120 mm) plus room to deform.
SHAPE = (96, 112, 96)
SPACING = 2.0


@dataclass
class Bundle:
    grid: Grid
    names: list
    labels: np.ndarray          # (S, I, J, K) int16, shared scheme
    t1: dict                    # name -> (I, J, K) float32 in [0, 1] (subjects with a real T1)
    info: dict                  # name -> {"levels", "reliable_labels", "split", ...}

    def subject_info(self, name: str) -> dict:
        return self.info[name]


def _volume(array, grid):
    from LiquidRegLib.io import Volume
    return Volume(np.asarray(array, np.float32), grid)


def _image_of(data_dir: Path, entry: dict, subject) -> np.ndarray:
    """The image the affine stage sees: the real T1, or the subject's fixed T1-like rendering."""
    if subject.t1 is not None:
        return np.where(subject.brainmask > 0, subject.t1, 0)
    from .volumes import load
    return load(data_dir / entry["files"]["t1_synth"])[0]


def build(data_dir, log=print) -> Bundle:
    """Align every non-test subject of ``data_dir`` (scripts/fetch_data.py) to the reference."""
    from LiquidRegLib.affine import affine_register

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    entries = {n: e for n, e in manifest["subjects"].items() if n not in TEST_SUBJECTS}
    if REFERENCE not in entries:
        raise FileNotFoundError(f"{data_dir} has no {REFERENCE}; run scripts/fetch_data.py first")
    reference = load_subject(data_dir, entries[REFERENCE])
    ref_image = _volume(_image_of(data_dir, entries[REFERENCE], reference), reference.grid)
    centre = reference.grid.voxel_to_ras(np.argwhere(reference.brainmask > 0).mean(0))
    affine = np.diag([SPACING] * 3 + [1.0])
    affine[:3, 3] = centre - SPACING * (np.asarray(SHAPE, float) - 1) / 2
    grid = Grid(SHAPE, affine)
    names, labels, t1, info = [], [], {}, {}
    for name in sorted(entries):
        entry = entries[name]
        subject = load_subject(data_dir, entry)
        image = _volume(_image_of(data_dir, entry, subject), subject.grid)
        world = np.eye(4) if name == REFERENCE else affine_register(ref_image, image)
        labels.append(resample(subject.labels.astype(np.int16), subject.grid, grid,
                               world_map=world, order="nearest"))
        if subject.t1 is not None:
            brain = normalise_intensity(np.where(subject.brainmask > 0, subject.t1, 0),
                                        subject.brainmask)
            t1[name] = resample(brain, subject.grid, grid, world_map=world)
        split = "validation" if name in VALIDATION_SUBJECTS else "train"
        info[name] = {"levels": entry["levels"], "reliable_labels": entry["reliable_labels"],
                      "split": split, "kind": entry["kind"], "licence": entry["licence"],
                      "source": entry["source"], "affine_to_reference": world.tolist()}
        names.append(name)
        log(f"bundle: {name} ({split}) aligned to {REFERENCE}")
    return Bundle(grid, names, np.stack(labels).astype(np.int16), t1, info)


def save(bundle: Bundle, path) -> None:
    """One compressed .npz (labels int16, T1 as uint8), written atomically."""
    path = Path(path)
    arrays = {"labels": bundle.labels, "affine": bundle.grid.affine}
    for name, image in bundle.t1.items():
        arrays[f"t1__{name}"] = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
    meta = {"names": bundle.names, "info": bundle.info, "reference": REFERENCE,
            "note": "training anatomies affinely aligned to the reference; see DATA.md"}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = _io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def load(path) -> Bundle:
    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        grid = Grid(tuple(z["labels"].shape[1:]), z["affine"])
        t1 = {k[4:]: z[k].astype(np.float32) / 255 for k in z.files if k.startswith("t1__")}
        return Bundle(grid, meta["names"], z["labels"], t1, meta["info"])


def split_names(bundle: Bundle, split: str) -> list:
    return [n for n in bundle.names if bundle.info[n]["split"] == split]


def shared(bundle: Bundle, a: str, b: str) -> tuple[str, list]:
    """Level and ids Dice is computed over for a pair of bundle subjects."""
    return L.shared_labels(bundle.info[a], bundle.info[b])
