"""DICOM header de-identification benchmark: SemID against dicognito, deid and dicom-anonymizer.

Every tool gets the same input folder and writes into its own output folder; each run is timed as a
whole (wall clock, interpreter start included for the command-line tools) and repeated; the table
shows the median files per second and, per the project's rule, peers as ratios to SemID measured in
the same run. Two corpora:

- the **canary corpus** (``semid.dicom.canary``): CT files with a distinct marker in every attribute
  the PS3.15 profile does not keep (top level, two and three sequences deep, private tags, free text,
  OB/UN, file meta). A leak is a marker whose bytes appear anywhere in a tool's output tree; markers
  are counted once each, by category. Canary headers are several times heavier than real ones (every
  attribute of Table E.1-1 is there three times), so speed is also measured on
- **realistic headers**: pydicom's bundled real GE CT and MR test files (``CT_small.dcm``,
  ``MR_small.dcm``), cloned with distinct patients, studies, series and instances.

Both are written flat (unique file names in one folder): ``dicom-anonymizer`` reads one folder level
only and ``deid`` names its outputs by the input file's base name.

The peers live in their own virtual environment (``--peers-venv``, made by ``make bench`` from
``benchmarks/peers-requirements.txt``) because they need pydicom 3 and SemID pins pydicom 2.4.
Run it with the project's Python (``make bench``); results go to ``--out`` (.md) and beside it (.json).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

import semid
from semid.dicom import pseudonyms as ps
from semid.dicom.canary import make_corpus
from semid.dicom.profile import ActionTable, Options, Profile
from semid.dicom.tree import deidentify_tree

REPO = Path(__file__).resolve().parent.parent
SERIES_PER_PATIENT = 4
SLICES = 15  # below semid.dicom.tree.MIN_VOLUME_SLICES: headers only, no image pipeline
PEERS = ("dicognito", "deid", "dicom-anonymizer")
SEMID_CLI, SEMID_LIB, SEMID_PROFILE = "SemID (CLI)", "SemID (library)", "SemID profile only"


# --------------------------------------------------------------------------------------------- corpora

@dataclass
class Corpus:
    name: str
    folder: Path
    files: list[Path]
    markers: dict[bytes, str] = field(default_factory=dict)  # marker bytes -> category (canary only)
    where: dict[bytes, str] = field(default_factory=dict)  # marker bytes -> canary's "where"
    kept: dict[str, str] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def _flatten(src: Path, dst: Path) -> list[Path]:
    dst.mkdir(parents=True)
    out = []
    for path in sorted(src.rglob("*.dcm")):
        target = dst / "_".join(path.relative_to(src).parts)
        shutil.move(path, target)
        out.append(target)
    return out


def canary_corpus(work: Path, n_files: int) -> Corpus:
    per_patient = SERIES_PER_PATIENT * SLICES
    patients = max(1, math.ceil(n_files / per_patient))
    canary = make_corpus(work / "canary-nested", patients=patients, series_per_patient=SERIES_PER_PATIENT,
                         slices=SLICES)
    files = _flatten(work / "canary-nested", work / "canary")
    shutil.rmtree(work / "canary-nested")
    for extra in files[n_files:]:
        extra.unlink()
    files = files[:n_files]
    corpus = Corpus("canary", work / "canary", files, kept=dict(canary.kept))
    scanner = Scanner(canary.markers)
    categories: dict[bytes, str] = {}
    for path in files:
        _categorise(path, scanner, categories)
    identity = {"PatientName", "PatientID", "PatientBirthDate", "PatientName family name in free text"}
    for marker in categories:
        if canary.markers[marker] in identity:
            categories[marker] = "patient name, ID, birth date|" + categories[marker].split("|")[1]
    corpus.markers = categories  # only the markers really present in the corpus files
    corpus.where = {m: canary.markers[m] for m in categories}
    corpus.stats = _corpus_stats(files)
    return corpus


def realistic_corpus(work: Path, n_files: int) -> Corpus:
    """Real vendor headers (GE CT and MR, private tags included) with distinct identities and UIDs."""
    sources = [pydicom.dcmread(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm")]
    folder = work / "realistic"
    folder.mkdir(parents=True)
    files = []
    per_patient = SERIES_PER_PATIENT * SLICES
    for i in range(n_files):
        p, s = i // per_patient, (i // SLICES) % SERIES_PER_PATIENT
        ds = copy.deepcopy(sources[s % 2])
        ds.PatientName, ds.PatientID = f"DOE^JANE{p:03d}", f"MRN{p:06d}"
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.998.{p}"
        ds.SeriesInstanceUID = f"{ds.StudyInstanceUID}.{s + 1}"
        ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{i % SLICES + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i % SLICES + 1
        path = folder / f"p{p}_s{s}_{i % SLICES}.dcm"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    corpus = Corpus("realistic", folder, files)
    corpus.stats = _corpus_stats(files)
    return corpus


def _count_elements(ds: pydicom.Dataset) -> int:
    n = 0
    for elem in ds:
        n += 1
        if elem.VR == "SQ":
            n += sum(_count_elements(item) for item in elem.value or [])
    return n


def _corpus_stats(files: list[Path]) -> dict:
    sizes, headers, elements = [], [], []
    for path in files:
        ds = pydicom.dcmread(path)
        size = path.stat().st_size
        pixels = len(ds.PixelData) if "PixelData" in ds else 0
        sizes.append(size)
        headers.append(size - pixels)
        elements.append(_count_elements(ds))
    return {"files": len(files), "mean_file_bytes": round(statistics.mean(sizes)),
            "mean_header_bytes": round(statistics.mean(headers)),
            "mean_data_elements": round(statistics.mean(elements))}


# ------------------------------------------------------------------------------------------ leak search

class Scanner:
    """Finds canary markers in bytes without trying every marker at every offset.

    Text markers (``QX...``), the corpus's marker UIDs and ``+7nnnnnn`` numbers are found anywhere.
    Purely numeric markers (dates, times, date-times) count where they stand as a whole value: a
    run of digits (and dots) split at its dots, one or two adjacent components; so a date marker is
    not "found" by chance inside a remapped UID's 39 random digits (a plain substring search expects
    about one such chance hit in SemID's output at 300 files, and more as the corpus grows). On
    peers' outputs this scanner finds exactly the markers a plain substring search finds.
    """

    _DIGITS = re.compile(rb"[0-9]+(?:\.[0-9]+)*")

    def __init__(self, markers: dict[bytes, str] | set[bytes]) -> None:
        self.markers = set(markers)
        self.qx = sorted({len(m) for m in self.markers if m.startswith(b"QX")})
        self.plus = sorted({len(m) for m in self.markers if m.startswith(b"+")})
        uids = [m for m in self.markers if m.count(b".") >= 4 and re.fullmatch(rb"[0-9.]+", m)]
        self.uid_prefix = os.path.commonprefix(uids) if uids else b""
        self.uid = sorted({len(m) for m in uids})
        numeric = [m for m in self.markers if re.fullmatch(rb"[0-9]+(\.[0-9]+)?", m)]
        self.numeric = set(numeric)
        covered = {m for m in self.markers if m.startswith((b"QX", b"+"))} | set(uids) | self.numeric
        self.other = sorted(self.markers - covered)  # searched plainly (none in today's corpus)
        if len(self.uid_prefix) < 8:
            self.other += uids
            self.uid = []

    def _at(self, blob: bytes, token: bytes, lengths: list[int], found: set[bytes]) -> None:
        start = blob.find(token)
        while start != -1:
            for length in lengths:
                piece = blob[start:start + length]
                if piece in self.markers:
                    found.add(piece)
            start = blob.find(token, start + 1)

    def scan(self, blob: bytes) -> set[bytes]:
        found: set[bytes] = set()
        self._at(blob, b"QX", self.qx, found)
        self._at(blob, b"+", self.plus, found)
        if self.uid:
            self._at(blob, self.uid_prefix, self.uid, found)
        numeric = self.numeric
        for match in self._DIGITS.finditer(blob):
            run = match.group()
            # In a file the byte after a value can be the low byte of the next tag's group, an ASCII
            # digit for groups 0030-0039 (AdmittingDate, then AdmittingTime's tag): a run may end
            # with one digit that is not the value's.
            for cut in (run, run[:-1]):
                if cut in numeric:
                    found.add(cut)
                if b"." in cut:
                    parts = cut.split(b".")
                    for i, part in enumerate(parts):
                        if part in numeric:
                            found.add(part)
                        if i + 1 < len(parts):
                            pair = part + b"." + parts[i + 1]
                            if pair in numeric:
                                found.add(pair)
        found.update(m for m in self.other if m in blob)
        return found


def _value_bytes(ds: pydicom.Dataset, tag) -> tuple[str, bytes]:
    raw = ds.get_item(tag)
    value = raw.value
    vr = raw.VR or ""
    if isinstance(value, bytes):
        return vr, value
    return vr, str(value).encode(errors="replace")


def _categorise(path: Path, scanner: Scanner, out: dict[bytes, str]) -> None:
    """Give each marker found in this file the category of the place it was planted."""
    ds = pydicom.dcmread(path)

    def walk(item: pydicom.Dataset, depth: int, private: bool) -> None:
        for tag in list(item.keys()):
            vr, value = _value_bytes(item, tag)
            if vr == "SQ":
                for child in item[tag].value or []:
                    walk(child, depth + 1, private or tag.is_private)
                continue
            found = [m for m in scanner.scan(value) if m not in out]
            if not found:
                continue
            if private or tag.is_private:
                kind = "private tags"
            elif vr in ("DA", "TM", "DT"):
                kind = "dates and times"
            elif vr == "UI":
                kind = "UIDs"
            elif vr in ("DS", "IS"):
                kind = "numbers (DS, IS)"
            elif vr in ("OB", "OW", "UN"):
                kind = "binary (OB, UN)"
            elif b"glioma" in value or b"follow-up" in value:
                kind = "free text (descriptors)"
            else:
                kind = "names, IDs, codes, other text"
            where = "top level" if depth == 0 else "inside sequences"
            for marker in found:
                out[marker] = f"{kind}|{where}"

    walk(ds, 0, False)
    meta = ds.file_meta
    for tag in list(meta.keys()):
        for marker in scanner.scan(_value_bytes(meta, tag)[1]):
            out.setdefault(marker, "file meta|top level")


def _tree_bytes(folder: Path):
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            yield Path(root) / name


def leaks(folder: Path, corpus: Corpus) -> set[bytes]:
    scanner = Scanner(corpus.markers)
    found: set[bytes] = set()
    for path in _tree_bytes(folder):
        found |= scanner.scan(path.read_bytes())
    return found


def kept_intact(folder: Path, kept: dict[str, str]) -> tuple[int, int]:
    """(files whose kept attributes all hold their planted values, DICOM files read)."""
    good = total = 0
    for path in _tree_bytes(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: not counted
            continue
        total += 1
        good += all(str(ds.get(k, "")) == v for k, v in kept.items())
    return good, total


def count_dicom(folder: Path) -> int:
    n = 0
    for path in _tree_bytes(folder):
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            n += 1
    return n


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in _tree_bytes(folder):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- tools

@dataclass
class Tool:
    name: str
    version: str
    kind: str  # "cli" (a subprocess, timed whole) or "in-process"
    run: Callable[[Path, Path, Path], float]  # (input, output, log) -> wall seconds
    writes: bool = True  # produces an output tree (the profile-only row does not)


def _subprocess(command: Callable[[Path, Path], list[str]], make_out: bool):
    def run(src: Path, dst: Path, log: Path) -> float:
        if make_out:
            dst.mkdir(parents=True)
        with open(log, "wb") as fh:
            started = time.perf_counter()
            proc = subprocess.run(command(src, dst), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            elapsed = time.perf_counter() - started
        if proc.returncode:
            with open(log, "ab") as fh:
                fh.write(f"\n[benchmark] exit code {proc.returncode}\n".encode())
        return elapsed

    return run


def _peer_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}), m.version('pydicom'))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.split()
        return f"{out[0]} (pydicom {out[1]})"
    except (subprocess.CalledProcessError, IndexError, OSError):
        return "?"


def semid_tools(key_file: Path, reports: Path) -> list[Tool]:
    semid_bin = Path(sys.executable).parent / "semid"
    version = f"{semid.__version__} (pydicom {pydicom.__version__})"
    key, _ = ps.load_key(key_file)
    options = Options()

    def cli(src: Path, dst: Path) -> list[str]:
        return [str(semid_bin), "deidentify-dicom", str(src), str(dst), "--no-ocr", "--key-file", str(key_file),
                "--quiet", "--report", str(reports / f"{dst.name}.json")]

    def library(src: Path, dst: Path, log: Path) -> float:
        started = time.perf_counter()
        report = deidentify_tree(src, dst, "high", options, key, ocr=False)
        elapsed = time.perf_counter() - started
        log.write_text(json.dumps({"files_written": report.files_written, "quarantined": report.quarantined}))
        return elapsed

    def profile_only(src: Path, dst: Path, log: Path) -> float:
        """Profile.apply alone on datasets already read (not timed); no file is written."""
        datasets = [pydicom.dcmread(path) for path in sorted(src.iterdir())]
        profile = Profile(key, options)
        started = time.perf_counter()
        for ds in datasets:
            profile.apply(ds, profile.context_for(ds))
        elapsed = time.perf_counter() - started
        dst.mkdir(parents=True)
        log.write_text(json.dumps({"files": len(datasets)}))
        return elapsed

    return [Tool(SEMID_CLI, version, "cli", _subprocess(cli, make_out=False)),
            Tool(SEMID_LIB, version, "in-process", library),
            Tool(SEMID_PROFILE, version, "in-process", profile_only, writes=False)]


def peer_tools(venv: Path) -> list[Tool]:
    bin_dir = venv / "bin"
    python = bin_dir / "python"
    commands = {
        # dicognito 0.19.0's console script calls main() without arguments: run the module instead.
        # --output-directory leaves the input untouched (the default would be to rewrite it in place).
        "dicognito": (lambda s, d: [str(python), "-m", "dicognito", "--output-directory", str(d), "--quiet", str(s)],
                      False),
        # deid's own CLI, default recipe (deid.dicom): get the identifiers, then put the replacements.
        "deid": (lambda s, d: [str(bin_dir / "deid"), "--quiet", "--outfolder", str(d), "identifiers",
                               "--input", str(s), "--action", "all"], True),
        # KitwareMedical's CLI, default rules (private tags deleted).
        "dicom-anonymizer": (lambda s, d: [str(bin_dir / "dicom-anonymizer"), str(s), str(d)], True),
    }
    return [Tool(name, _peer_version(python, name), "cli", _subprocess(cmd, make_out))
            for name, (cmd, make_out) in commands.items()]


# ------------------------------------------------------------------------------------------- the runs

def _tail(log: Path, work: Path) -> str:
    """The end of a run's log, without machine paths (scratch folder, checkout)."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace")[-600:]
    for path, name in ((work.resolve(), "<work>"), (work, "<work>"), (REPO, "<repo>"), (Path.home(), "~")):
        if len(str(path)) > 1:
            text = text.replace(str(path), name)
    return text


def run_tool(tool: Tool, corpus: Corpus, work: Path, repeats: int, check_leaks: bool) -> dict:
    n_in = len(corpus.files)
    source_digest = digest(corpus.folder)
    runs = []
    result: dict = {"tool": tool.name, "version": tool.version, "kind": tool.kind}
    slug = re.sub(r"[^a-z0-9]+", "-", tool.name.lower()).strip("-")
    for rep in range(repeats):
        src = work / f"in-{corpus.name}-{slug}-{rep}"
        dst = work / f"out-{corpus.name}-{slug}-{rep}"
        log = work / "logs" / f"{corpus.name}-{slug}-{rep}.log"
        shutil.copytree(corpus.folder, src)  # a fresh copy per run: a tool that writes in place harms nothing
        seconds = tool.run(src, dst, log)
        written = count_dicom(dst) if tool.writes else n_in
        runs.append({"seconds": round(seconds, 3), "files_written": written,
                     "files_per_s": round(written / seconds, 2) if seconds else 0.0,
                     "input_modified": digest(src) != source_digest,
                     "log_tail": _tail(log, work)})
        print(f"  [{corpus.name}] {tool.name:24s} run {rep + 1}/{repeats}: {seconds:7.2f} s, "
              f"{written}/{n_in} files, {runs[-1]['files_per_s']:.1f} files/s", file=sys.stderr, flush=True)
        if rep == 0 and check_leaks and tool.writes:
            leaked = leaks(dst, corpus)
            good, read = kept_intact(dst, corpus.kept)
            result["leaked"] = len(leaked)
            result["leaks_by_category"] = dict(Counter(corpus.markers[m] for m in leaked))
            by_attribute = Counter(corpus.where[m] for m in leaked)
            result["leaked_attributes"] = dict(sorted(by_attribute.items(), key=lambda kv: (-kv[1], kv[0])))
            result["kept_intact_files"] = [good, read]
        shutil.rmtree(src)
        shutil.rmtree(dst)
    result["runs"] = runs
    result["files_per_s"] = round(statistics.median(r["files_per_s"] for r in runs), 1)
    result["seconds_median"] = round(statistics.median(r["seconds"] for r in runs), 2)
    result["files_failed"] = n_in - min(r["files_written"] for r in runs)
    result["input_modified"] = any(r["input_modified"] for r in runs)
    return result


def machine() -> dict:
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus": cores, "cpu_model": model, "ram_gib": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}


# ------------------------------------------------------------------------------------------ the report

def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}×" if base else "—"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [
        "## DICOM header de-identification benchmark", "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Python {m['python']}, {m['os']}. "
        f"Command: `{data['command']}` ({data['repeats']} runs per tool, median shown).", "",
    ]
    for cname, corpus in data["corpora"].items():
        st = corpus["stats"]
        results = corpus["results"]
        base = next((r["files_per_s"] for r in results if r["tool"] == SEMID_CLI), 0.0)
        if cname == "canary":
            lines += [f"### Canary corpus: {st['files']} files, {corpus['markers']} distinct markers", ""]
        else:
            lines += [f"### Realistic headers: {st['files']} files (speed only)", ""]
        lines.append(f"Mean file {st['mean_file_bytes']} B, header {st['mean_header_bytes']} B, "
                     f"{st['mean_data_elements']} data elements (nested ones included). {corpus['note']}")
        lines.append("")
        head = "| tool | version | files/s (median) | ratio to SemID CLI | files failed |"
        rule = "|---|---|---:|---:|---:|"
        if cname == "canary":
            head += " markers leaked / total | kept values intact |"
            rule += "---:|---:|"
        lines += [head, rule]
        for r in results:
            row = (f"| {r['tool']} | {r['version']} | {r['files_per_s']:.1f} | {_ratio(r['files_per_s'], base)} "
                   f"| {r['files_failed']} |")
            if cname == "canary":
                if "leaked" in r:
                    good, read = r["kept_intact_files"]
                    row += f" {r['leaked']} / {corpus['markers']} | {good} / {read} files |"
                else:
                    row += " — | — |"
            lines.append(row)
        lines.append("")
    lines += [
        "Files/s = DICOM files written ÷ wall-clock seconds of the whole run. CLI rows are subprocesses timed "
        "from start to exit, interpreter start and imports included (SemID's CLI as well as the peers'); "
        "`SemID (library)` is `semid.dicom.tree.deidentify_tree` in the benchmark's own process (imports "
        "done), reading and writing files like the CLI; `SemID profile only` times `Profile.apply` on "
        "datasets already in memory (no reading, no writing). SemID runs with `--no-ocr` and a key file; "
        "peers with their defaults. Ratios are files/s ÷ SemID CLI files/s measured in the same run. "
        "Files failed = input files without a DICOM output.", "",
    ]
    canary = data["corpora"].get("canary")
    if canary:
        writers = [r for r in canary["results"] if "leaked" in r]
        cats = Counter(canary["categories"])
        lines += ["### Where the leaks are (canary corpus): markers leaked per category", "",
                  "| category | markers | " + " | ".join(r["tool"] for r in writers) + " |",
                  "|---|---:|" + "---:|" * len(writers)]
        kinds = Counter()
        places = Counter()
        for cat, n in cats.items():
            kind, place = cat.split("|")
            kinds[kind] += n
            places[place] += n
        for kind, n in kinds.most_common():
            cells = [sum(v for c, v in r["leaks_by_category"].items() if c.split("|")[0] == kind) for r in writers]
            lines.append(f"| {kind} | {n} | " + " | ".join(str(c) for c in cells) + " |")
        for place, n in places.most_common():
            cells = [sum(v for c, v in r["leaks_by_category"].items() if c.split("|")[1] == place) for r in writers]
            lines.append(f"| *{place}* | {n} | " + " | ".join(str(c) for c in cells) + " |")
        lines += ["", "Rows above the italic ones split the markers by kind; the italic rows split the same "
                  "markers by depth (each sums to the total). A marker counts once however often it appears.", ""]
        attributes = canary["attributes"]
        for r in writers:
            leaked = r["leaked_attributes"]
            if leaked:
                sample = ", ".join(sorted(leaked)[:8])
                lines.append(f"- {r['tool']}: markers leaked from {len(leaked)} of the {attributes} planted "
                             f"attributes (A-Z: {sample}, ...)")
            else:
                lines.append(f"- {r['tool']}: no marker leaked from any of the {attributes} planted attributes")
        lines += ["", "(An attribute here is the canary's name for where a marker was planted: a keyword, "
                  "`Sequence>PatientName` for a sequence's item, or a private-tag slot.)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300, help="files per corpus (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool; the median is reported (default 3)")
    parser.add_argument("--out", default="benchmarks/results/dicom_headers.md",
                        help="Markdown table (a .json with every run goes beside it)")
    parser.add_argument("--peers-venv", default=".venv-peers",
                        help="virtual environment with dicognito, deid and dicom-anonymizer (make bench makes it)")
    parser.add_argument("--tools", help="comma-separated subset of: semid-cli, semid-lib, semid-profile, " +
                        ", ".join(PEERS))
    parser.add_argument("--corpora", default="canary,realistic", help="comma-separated: canary, realistic")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed at the end)")
    parser.add_argument("--command", default="make bench", help="the command to quote in the report")
    args = parser.parse_args(argv)
    # a stopped benchmark (SIGTERM) still ends the tool it is running and removes its scratch folder
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="semid-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    (work / "reports").mkdir(exist_ok=True)
    try:
        key_file = work / "bench.key"
        key_file.write_bytes(os.urandom(32).hex().encode() + b"\n")
        ActionTable.load()  # the library rows time the work, not the first table load
        tools = semid_tools(key_file, work / "reports")
        peers_venv = Path(args.peers_venv)
        if (peers_venv / "bin" / "python").exists():
            tools += peer_tools(peers_venv)
        else:
            print(f"no peers virtual environment at {peers_venv}: SemID only (make bench makes it)", file=sys.stderr)
        if args.tools:
            names = {"semid-cli": SEMID_CLI, "semid-lib": SEMID_LIB, "semid-profile": SEMID_PROFILE}
            wanted = {names.get(t.strip(), t.strip()) for t in args.tools.split(",")}
            tools = [t for t in tools if t.name in wanted]
        data = {"command": args.command, "repeats": args.repeats, "machine": machine(), "corpora": {}}
        for cname in [c.strip() for c in args.corpora.split(",") if c.strip()]:
            print(f"building the {cname} corpus ({args.files} files; not timed)", file=sys.stderr, flush=True)
            corpus = canary_corpus(work, args.files) if cname == "canary" else realistic_corpus(work, args.files)
            entry = {"stats": corpus.stats, "results": []}
            if cname == "canary":
                entry["markers"] = len(corpus.markers)
                entry["categories"] = dict(Counter(corpus.markers.values()))
                entry["attributes"] = len(set(corpus.where.values()))
                entry["note"] = ("Every Table E.1-1 attribute the profile does not keep carries a marker at top "
                                 "level and two and three sequences deep, so a canary header is several times "
                                 "heavier than a real one (next table).")
            else:
                entry["note"] = ("pydicom's real GE CT and MR test headers (`CT_small.dcm`, `MR_small.dcm`, private "
                                 "tags included), cloned with distinct patients and UIDs: the size of real headers.")
            for tool in tools:
                entry["results"].append(run_tool(tool, corpus, work, args.repeats, check_leaks=cname == "canary"))
            data["corpora"][cname] = entry
            shutil.rmtree(corpus.folder)
        text = markdown(data)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str))
        print(text)
        print(f"written: {out} and {out.with_suffix('.json')}", file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
