"""The PS3.15 Annex E action table: generated from the standard's tables, well-formed, and right on known rows."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_JSON = REPO_ROOT / "core" / "semid" / "data" / "ps315_annex_e.json"
SCRIPT = REPO_ROOT / "scripts" / "make_ps315_table.py"

# One code or several joined by "/", each optionally starred (U* is PS3.15's code for UID sequences).
CODE_RE = re.compile(r"^[DZXKCU]\*?(?:/[DZXKCU]\*?)*$")
# The ten option columns of Table E.1-1, in table order.
OPTION_ORDER = [
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_full_dates",
    "retain_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]
OPTION_KEYS = set(OPTION_ORDER)


def _source_path() -> Path:
    """The saved standard extract (not committed: the standard's text stays out of the repository)."""
    data_dir = os.environ.get("SEMID_DATA_DIR")
    base = Path(data_dir) if data_dir else REPO_ROOT / ".data"
    return base / "standard" / "part15_tables.html"


def _load_script() -> ModuleType:
    """Import scripts/make_ps315_table.py, which is a script rather than a package module."""
    spec = importlib.util.spec_from_file_location("make_ps315_table", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table() -> dict:
    return json.loads(TABLE_JSON.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def by_tag(table) -> dict[str, dict]:
    return {row["tag"]: row for row in table["attributes"]}


def test_committed_json_is_what_the_script_generates():
    source = _source_path()
    if not source.is_file():
        pytest.skip(f"{source} not found: the PS3.15 extract is not committed; see scripts/make_ps315_table.py")
    script = _load_script()
    assert script.dumps(script.build(source)) == TABLE_JSON.read_text(encoding="utf-8")
    assert json.loads(TABLE_JSON.read_text())["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()


def test_provenance_fields(table):
    assert table["standard"] == "DICOM PS3.15"
    assert re.fullmatch(r"\d{4}[a-z]?", table["edition"])
    assert re.fullmatch(r"[0-9a-f]{64}", table["source_sha256"])
    assert table["source_name"] and "/" not in table["source_name"]
    assert table["table"] == "E.1-1"
    assert table["generated_by"] == "scripts/make_ps315_table.py"
    assert [o["key"] for o in table["options"]] == OPTION_ORDER


def test_every_action_code_is_well_formed(table):
    assert len(table["attributes"]) > 300
    for row in table["attributes"]:
        assert CODE_RE.match(row["basic"]), row
        assert set(row["options"]) <= OPTION_KEYS, row
        for code in row["options"].values():
            assert CODE_RE.match(code), row
        assert isinstance(row["retired"], bool) and isinstance(row["in_std_iod"], bool)
        assert row["name"] and "see Note" not in row["name"]


def test_tags_are_unique_and_well_formed(table):
    tags = [row["tag"] for row in table["attributes"]]
    assert len(tags) == len(set(tags))
    for row in table["attributes"]:
        assert re.fullmatch(r"\(([0-9A-F]{4}|[0-9A-Fx]{4}|gggg),([0-9A-F]{4}|[0-9A-Fx]{4}|eeee)\)", row["tag"]), row
        assert row["pattern"] == bool(re.search(r"[xge]", row["tag"])), row
        if not row["pattern"]:
            assert row["keyword"], row  # pydicom knows every plain tag of the table
    private = [(row["creator"], row["tag"]) for row in table["safe_private"]]
    assert private and len(private) == len(set(private))
    for row in table["safe_private"]:
        assert re.fullmatch(r"\([0-9A-F]{4},xx[0-9A-F]{2}\)", row["tag"]), row
        assert int(row["tag"][1:5], 16) % 2 == 1, row  # private groups are odd
        assert row["creator"], row


@pytest.mark.parametrize(
    ("tag", "keyword", "basic", "options"),
    [
        ("(0010,0010)", "PatientName", "Z", {}),
        ("(0010,0020)", "PatientID", "Z", {}),
        ("(0020,000D)", "StudyInstanceUID", "U", {"retain_uids": "K"}),
        ("(0010,0040)", "PatientSex", "Z", {"retain_patient_characteristics": "K"}),
        ("(0008,0020)", "StudyDate", "Z", {"retain_full_dates": "K", "retain_modified_dates": "C"}),
        ("(0008,1030)", "StudyDescription", "X", {"clean_descriptors": "C"}),
        ("(0008,0080)", "InstitutionName", "X/Z/D", {"retain_institution_identity": "K"}),
        ("(0008,1140)", "ReferencedImageSequence", "X/Z/U*", {"retain_uids": "K"}),
        ("(60xx,3000)", "OverlayData", "X", {"clean_graphics": "C"}),
    ],
)
def test_known_rows(by_tag, tag, keyword, basic, options):
    row = by_tag[tag]
    assert row["keyword"] == keyword
    assert row["basic"] == basic
    assert row["options"] == options


def test_private_attributes_row(by_tag):
    row = by_tag["(gggg,eeee)"]
    assert row["pattern"] and row["tag_condition"] == "where gggg is odd"
    assert row["basic"] == "X"
    assert row["options"] == {"retain_safe_private": "C"}


# A few rows in the markup of NEMA's DocBook rendering (anchors, bold headers, a footnote, a
# zero-width space), to check that the parser reads the full part15.html and not only the extract.
_DOCBOOK = """<?xml version="1.0" encoding="UTF-8"?>
<html xmlns="http://www.w3.org/1999/xhtml"><head><title>PS3.15</title>
<style type="text/css"><![CDATA[ p { font-size: 15px; } ]]></style></head><body>
<div class="titlepage"><div font-size="14pt"><h2 class="subtitle">DICOM PS3.15 2099a - Security and
 System Management Profiles</h2></div><hr xmlns="" /></div>
<p>See <a class="xref" href="#table_E.1-1" shape="rect">Table E.1-1</a>.</p>
<div class="table"><a id="table_E.1-1" shape="rect"></a>
<div class="table-contents"><table frame="box" rules="all"><thead><tr valign="top">{head}</tr></thead>
<tbody>{rows}</tbody></table></div></div>
<div class="table"><a id="table_E.3.10-1" shape="rect"></a><table><thead><tr>
<th><p><span class="bold"><strong>Data Element</strong></span></p></th><th><p>Private Creator</p></th>
<th><p>VR</p></th><th><p>VM</p></th><th><p>Meaning</p></th></tr></thead><tbody><tr>
<td><p><a id="para_1" shape="rect"></a>(0043,xx39)</p></td><td><p>GEMS_PARM_01</p></td><td><p>IS</p></td>
<td><p>4</p></td><td><p>1<sup>st</sup> value is B Value</p></td></tr></tbody></table></div>
</body></html>
"""


def _docbook(header: tuple[str, ...]) -> str:
    head = "".join(
        f'<th align="center" rowspan="1" colspan="1"><p><a id="para_h{i}" shape="rect"></a>'
        f'<span class="bold"><strong>{h}</strong></span></p></th>'
        for i, h in enumerate(header)
    )
    cells = [
        ["Patient\u200b's Name", "(0010,0010)", "N", "Y", "Z"] + [""] * 10,
        ["Icon Image Sequence</p><p>(see Note 12)", "(0088,0200)", "N", "Y", "X"] + [""] * 10,
        [
            '<span class="italic">Private attributes</span>',
            '<span class="italic">(gggg,eeee) where gggg is odd</span>',
            "N",
            "N",
            'X<sup>[<a href="#ftn.1" class="footnote">a</a>]</sup>',
            "C",
        ]
        + [""] * 9,
    ]
    rows = "".join(
        '<tr valign="top">'
        + "".join(
            f'<td align="center" rowspan="1" colspan="1"><p>\n   <a id="para_{r}_{c}" shape="rect"></a>{v}</p></td>'
            if v
            else '<td align="center" rowspan="1" colspan="1"></td>'
            for c, v in enumerate(row)
        )
        + "</tr>"
        for r, row in enumerate(cells)
    )
    return _DOCBOOK.replace("{head}", head).replace("{rows}", rows)


def test_parser_reads_docbook_markup(tmp_path):
    script = _load_script()
    header = tuple(
        h.replace("(from PS3.6)", '(from <a href="part06.html#PS3.6" class="olink">PS3.6</a>)')
        for h in script.ATTRIBUTE_HEADER
    )
    source = tmp_path / "part15.html"
    source.write_text(_docbook(header), encoding="utf-8")
    doc = script.build(source)
    assert doc["edition"] == "2099a"
    assert doc["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    rows = {row["tag"]: row for row in doc["attributes"]}
    assert rows["(0010,0010)"]["name"] == "Patient's Name"
    assert rows["(0010,0010)"]["keyword"] == "PatientName"
    assert rows["(0088,0200)"]["name"] == "Icon Image Sequence"
    assert rows["(0088,0200)"]["notes"] == ["Note 12"]
    private = rows["(gggg,eeee)"]
    assert private["basic"] == "X"  # the footnote marker is not part of the code
    assert private["options"] == {"retain_safe_private": "C"}
    assert doc["safe_private"] == [
        {
            "creator": "GEMS_PARM_01",
            "tag": "(0043,xx39)",
            "vr": "IS",
            "vm": "4",
            "meaning": "1st value is B Value",
            "condition": "",
        }
    ]


def test_parser_rejects_a_changed_header(tmp_path):
    script = _load_script()
    header = list(script.ATTRIBUTE_HEADER)
    header[5], header[6] = header[6], header[5]  # two option columns swapped
    source = tmp_path / "part15.html"
    source.write_text(_docbook(tuple(header)), encoding="utf-8")
    with pytest.raises(ValueError, match="unexpected header"):
        script.build(source)
