"""Building the local data folder: every subject in the standard form plus ``manifest.json``.

Idempotent and resumable: a subject whose files and manifest entry exist (built from the same
source files) is skipped, the manifest is rewritten atomically after each subject, so an
interrupted run continues where it stopped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import labels as L
from . import sources, subjects, synth, volumes

MANIFEST = "manifest.json"
#: Build order: the donors need fsaverage as their propagation atlas (a training subject, so
#: nothing from the held-out MNI template leaks into training labels).
ORDER = ("mni152_2009a", "fsaverage") + tuple(f"donor_{uid}" for uid in subjects.DONORS)


def read_manifest(out) -> dict:
    path = Path(out) / MANIFEST
    if not path.exists():
        return {"subjects": {}}
    return json.loads(path.read_text())


def _write_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_subject(out: Path, subject: subjects.Subject) -> dict:
    """Write a subject's files and return its manifest entry."""
    files = {"labels": f"{subject.name}_labels.nii.gz",
             "brainmask": f"{subject.name}_brainmask.nii.gz"}
    volumes.save(out / files["labels"], subject.labels.astype(np.int16), subject.grid)
    volumes.save(out / files["brainmask"], subject.brainmask.astype(np.uint8), subject.grid)
    if subject.t1 is not None:
        files["t1"] = f"{subject.name}_t1.nii.gz"
        volumes.save(out / files["t1"], subject.t1.astype(np.float32), subject.grid)
    else:
        files["t1_synth"] = _write_t1_synth(out, subject.name, subject.labels, subject.grid)
    return {
        "name": subject.name, "kind": subject.kind, "split": subject.split,
        "source": subject.provenance, "licence": subject.licence, "notes": subject.notes,
        "files": files, "shape": list(subject.grid.shape),
        "levels": L.subject_levels(subject.reliable_labels),
        "reliable_labels": sorted(int(i) for i in subject.reliable_labels),
        "labels_present": sorted(int(i) for i in np.unique(subject.labels) if i > 0),
    }


def _write_t1_synth(out: Path, name: str, labels: np.ndarray, grid) -> str:
    """A deterministic T1-like image for a label-only subject (benchmarks need an image)."""
    file = f"{name}_t1synth.nii.gz"
    volumes.save(out / file, synth.rendering(labels, "t1"), grid)
    return file


def benchmark_pairs(manifest: dict) -> list[tuple[str, str]]:
    """Every pair of held-out subjects, templates as the fixed image, in a stable order."""
    test = sorted((e["kind"] != "template", e["name"]) for e in manifest["subjects"].values()
                  if e["split"] == "test")
    names = [name for _, name in test]
    return [(a, b) for n, a in enumerate(names) for b in names[n + 1:]]


def load_subject(out, entry: dict) -> subjects.Subject:
    """A subject back from the data folder (for use as an atlas, or to remake the sample pair)."""
    out = Path(out)
    labels, grid = volumes.load(out / entry["files"]["labels"])
    mask, _ = volumes.load(out / entry["files"]["brainmask"])
    t1 = None
    if "t1" in entry["files"]:
        t1 = np.asarray(volumes.load(out / entry["files"]["t1"])[0], np.float32)
    return subjects.Subject(entry["name"], entry["kind"], grid, np.asarray(labels, np.int16),
                            np.asarray(mask, np.uint8), t1, entry["reliable_labels"],
                            entry["source"], entry["licence"], entry["notes"])


def _up_to_date(out: Path, entry: dict | None) -> bool:
    return bool(entry) and all((out / f).exists() for f in entry["files"].values())


def fetch_all(out, cache=None, only=None, force=False, log=print) -> dict:
    """Build every subject (or those named in ``only``) into ``out``; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache) if cache else out / "cache" / "wheels"
    work = out / "cache" / "extracted"
    manifest = read_manifest(out)
    manifest["packages"] = {p.name: {"version": p.version, "licence": p.licence}
                            for p in sources.PACKAGES}
    manifest["label_scheme"] = {"levels": list(L.LEVELS), "names": {str(k): v for k, v in
                                                                     L.NAMES.items()}}
    manifest["test_subjects"] = list(subjects.TEST_SUBJECTS)
    built: dict = {}
    for name in ORDER:
        if only and name not in only:
            continue
        entry = manifest["subjects"].get(name)
        if _up_to_date(out, entry) and not force:
            if "t1" not in entry["files"] and "t1_synth" not in entry["files"]:
                labels, grid = volumes.load(out / entry["files"]["labels"])
                entry["files"]["t1_synth"] = _write_t1_synth(out, name, labels, grid)
                log(f"{name}: wrote {entry['files']['t1_synth']}")
            log(f"{name}: up to date ({entry['split']})")
            continue
        log(f"{name}: building")
        if name == "mni152_2009a":
            subject = subjects.build_mni(cache, work, log)
        elif name == "fsaverage":
            subject = subjects.build_fsaverage(cache, work, log)
        else:
            atlas = built.get("fsaverage")
            if atlas is None:
                atlas_entry = manifest["subjects"].get("fsaverage")
                if not _up_to_date(out, atlas_entry):
                    atlas = built["fsaverage"] = subjects.build_fsaverage(cache, work, log)
                    manifest["subjects"]["fsaverage"] = write_subject(out, atlas)
                else:
                    atlas = built["fsaverage"] = load_subject(out, atlas_entry)
            subject = subjects.build_donor(name.split("_", 1)[1], atlas, cache, work, log)
        built[name] = subject
        manifest["subjects"][name] = write_subject(out, subject)
        _write_manifest(out, manifest)
        log(f"{name}: wrote {', '.join(manifest['subjects'][name]['files'].values())} "
            f"({subject.split}, levels {manifest['subjects'][name]['levels']})")
    _save_licences(out, cache, log)
    _write_manifest(out, manifest)
    return manifest


def _save_licences(out: Path, cache: Path, log) -> None:
    """Keep each package's licence text next to the data derived from it (``licences/``)."""
    for package in sources.PACKAGES:
        target = out / "licences" / f"{package.name}.txt"
        wheels = sorted(Path(cache).glob(package.wheel_prefix + "*.whl"))
        if target.exists() or not wheels:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n\n".join(sources.read_text(wheels[0], member)
                                       for member in package.licence_files))
        log(f"licence of {package.requirement} -> {target}")
