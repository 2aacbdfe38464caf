#!/usr/bin/env python3
"""Generate SemID's DICOM de-identification action table from the standard's own tables.

Input: DICOM PS3.15 (Security and System Management Profiles) as the DocBook XHTML that NEMA
publishes (``part15.html`` from the DICOM standard's website, "output/html"), or any file that
holds Table E.1-1 (Application Level Confidentiality Profile Attributes) and Table E.3.10-1 (Safe
Private Attributes) verbatim in that markup, plus the title page with the edition string.

Output: a JSON file (default ``core/semid/data/ps315_annex_e.json``) with the edition, the SHA-256
of the input file, every row of Table E.1-1 with its Basic Profile and option action codes copied
as written, and every row of Table E.3.10-1. The codes are not interpreted here; the
de-identifier does that.

Usage::

    python scripts/make_ps315_table.py SOURCE.html [-o core/semid/data/ps315_annex_e.json]

Standard library only, plus pydicom (a SemID dependency) for attribute keywords.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "core" / "semid" / "data" / "ps315_annex_e.json"

ATTRIBUTE_TABLE_ID = "table_E.1-1"
SAFE_PRIVATE_TABLE_ID = "table_E.3.10-1"

# Table E.1-1 header as printed (after whitespace normalisation). Checked exactly so that a future
# edition that adds, drops or reorders columns fails loudly instead of shifting codes into the wrong
# option.
ATTRIBUTE_HEADER = (
    "Attribute Name",
    "Tag",
    "Retd. (from PS3.6)",
    "In Std. Comp. IOD (from PS3.3)",
    "Basic Prof.",
    "Rtn. Safe Priv. Opt.",
    "Rtn. UIDs Opt.",
    "Rtn. Dev. Id. Opt.",
    "Rtn. Inst. Id. Opt.",
    "Rtn. Pat. Chars. Opt.",
    "Rtn. Long. Full Dates Opt.",
    "Rtn. Long. Modif. Dates Opt.",
    "Clean Desc. Opt.",
    "Clean Struct. Cont. Opt.",
    "Clean Graph. Opt.",
)

# Short keys for the ten option columns, in table order.
OPTION_KEYS = (
    ("retain_safe_private", "Rtn. Safe Priv. Opt."),
    ("retain_uids", "Rtn. UIDs Opt."),
    ("retain_device_identity", "Rtn. Dev. Id. Opt."),
    ("retain_institution_identity", "Rtn. Inst. Id. Opt."),
    ("retain_patient_characteristics", "Rtn. Pat. Chars. Opt."),
    ("retain_full_dates", "Rtn. Long. Full Dates Opt."),
    ("retain_modified_dates", "Rtn. Long. Modif. Dates Opt."),
    ("clean_descriptors", "Clean Desc. Opt."),
    ("clean_structured_content", "Clean Struct. Cont. Opt."),
    ("clean_graphics", "Clean Graph. Opt."),
)

# Safe Private table columns we know; "VM" and a conditions column are optional because the
# table's layout has changed between editions.
SAFE_PRIVATE_FIELDS = {
    "Data Element": "tag",
    "Private Creator": "creator",
    "VR": "vr",
    "VM": "vm",
    "Meaning": "meaning",
}

# One action code or several joined by "/" (e.g. "X/Z/U*"); "*" marks the U* variant that PS3.15
# defines for sequences of UID references.
ACTION_CODE_RE = re.compile(r"^[DZXKCU]\*?(?:/[DZXKCU]\*?)*$")
EDITION_RE = re.compile(r"DICOM\s+PS3\.15\s+(\d{4}[a-z]?)")
TAG_RE = re.compile(r"^\(\s*([0-9A-Za-z]{4})\s*,\s*([0-9A-Za-z]{4})\s*\)\s*(.*)$")
NOTE_RE = re.compile(r"\(\s*see\s+(Notes?\s+[0-9][0-9 ,and]*)\)", re.IGNORECASE)

# Characters the DocBook rendering uses for layout only.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)


def normalise(text: str) -> str:
    """Collapse whitespace and drop invisible layout characters."""
    text = text.translate(INVISIBLE).replace("\u00a0", " ")
    return " ".join(text.split())


class _TableCollector(HTMLParser):
    """Collects the rows of the tables whose anchor id is wanted, plus the document's title text.

    The DocBook output puts ``<a id="table_X"/>`` just before each ``<table>``; that id names the
    table. Cells are lists of paragraphs; footnote references (``<sup>`` holding a footnote link)
    are dropped because they are not part of the cell's value.
    """

    def __init__(self, wanted: set[str]) -> None:
        super().__init__(convert_charrefs=True)
        self.wanted = wanted
        self.tables: dict[str, dict[str, list[list[list[str]]]]] = {}
        self.title_text: list[str] = []
        self._in_title = 0
        self._pending_id: str | None = None
        self._table_id: str | None = None
        self._table_depth = 0
        self._section = "body"
        self._row: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self._para: list[str] | None = None
        self._sup_stack: list[dict[str, object]] = []

    # -- helpers ---------------------------------------------------------------------------------
    def _emit(self, text: str) -> None:
        if self._in_title:
            self.title_text.append(text)
        if self._cell is None:
            return
        if self._sup_stack:
            self._sup_stack[-1]["text"].append(text)  # type: ignore[union-attr]
            return
        if self._para is None:
            self._para = []
        self._para.append(text)

    def _close_para(self) -> None:
        if self._cell is not None and self._para is not None:
            self._cell.append("".join(self._para))
        self._para = None

    # -- HTMLParser callbacks --------------------------------------------------------------------
    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: (v or "") for k, v in attrs}
        if tag in ("title", "h1", "h2") or "subtitle" in a.get("class", ""):
            self._in_title += 1
        if tag == "a" and a.get("id", "").startswith("table_"):
            self._pending_id = a["id"]
        if tag == "table":
            if self._table_id is not None:
                self._table_depth += 1
                if self._table_depth > 1:
                    raise ValueError(f"nested table inside {self._table_id}: cannot parse")
                return
            if self._pending_id in self.wanted:
                self._table_id = self._pending_id
                self._table_depth = 1
                self.tables[self._table_id] = {"head": [], "body": []}
            self._pending_id = None
            return
        if self._table_id is None:
            return
        if tag in ("thead", "tbody"):
            self._section = "head" if tag == "thead" else "body"
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            if a.get("colspan", "1") != "1" or a.get("rowspan", "1") != "1":
                # Spanning cells would shift every later column; these tables have none.
                raise ValueError(f"spanning cell in {self._table_id}: cannot parse")
            self._cell = []
            self._para = None
        elif tag == "p":
            self._close_para()
            self._para = []
        elif tag == "br":
            self._emit(" ")
        elif tag == "sup":
            self._sup_stack.append({"text": [], "footnote": False})
        elif tag == "a" and self._sup_stack:
            if "footnote" in a.get("class", "") or a.get("href", "").startswith("#ftn"):
                self._sup_stack[-1]["footnote"] = True

    def handle_endtag(self, tag: str) -> None:
        if self._in_title and tag in ("title", "h1", "h2"):
            self._in_title -= 1
        if self._table_id is None:
            return
        if tag == "table":
            self._table_depth -= 1
            if self._table_depth == 0:
                self._table_id = None
        elif tag == "sup" and self._sup_stack:
            sup = self._sup_stack.pop()
            # Ordinals such as "1<sup>st</sup>" are text; footnote markers are not.
            if not sup["footnote"]:
                self._emit("".join(sup["text"]))  # type: ignore[arg-type]
        elif tag == "p":
            self._close_para()
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._close_para()
            self._row.append([normalise(p) for p in self._cell if normalise(p)])
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table_id][self._section].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self._emit(data)


def cell_text(paragraphs: list[str]) -> str:
    """A cell's value: its paragraphs joined by a space."""
    return normalise(" ".join(paragraphs))


def split_notes(paragraphs: list[str]) -> tuple[str, list[str]]:
    """Separate "(see Note 12)" references from an attribute name."""
    text = cell_text(paragraphs)
    notes = [normalise(m.group(1)) for m in NOTE_RE.finditer(text)]
    return normalise(NOTE_RE.sub(" ", text)), notes


def parse_tag(text: str) -> tuple[str, bool, str]:
    """Return (tag, is_pattern, qualifier) for a Tag cell such as "(0010,0010)" or "(50xx,xxxx)".

    Hex digits are upper-cased and the standard's placeholders ("x", "gggg", "eeee") lower-cased, so
    the same tag is always spelled the same way. Trailing words ("where gggg is odd") are kept as the
    qualifier.
    """
    m = TAG_RE.match(normalise(text))
    if not m:
        raise ValueError(f"not a tag: {text!r}")
    fields = []
    pattern = False
    for field in m.group(1, 2):
        low = field.lower()
        if low in ("gggg", "eeee"):
            fields.append(low)
            pattern = True
        elif "x" in low:
            if not re.fullmatch(r"[0-9a-fx]{4}", low):
                raise ValueError(f"not a tag: {text!r}")
            fields.append("".join(c if c == "x" else c.upper() for c in low))
            pattern = True
        elif re.fullmatch(r"[0-9a-f]{4}", low):
            fields.append(low.upper())
        else:
            raise ValueError(f"not a tag: {text!r}")
    return f"({fields[0]},{fields[1]})", pattern, m.group(3).strip()


def keyword_for(tag: str) -> str:
    """pydicom's keyword for a tag; repeating-group patterns (60xx) use their first group."""
    from pydicom.datadict import keyword_for_tag

    if "gggg" in tag or "eeee" in tag:
        return ""
    value = int(tag.strip("()").replace(",", "").replace("x", "0"), 16)
    try:
        return keyword_for_tag(value) or ""
    except Exception:  # noqa: BLE001 - pydicom raises various errors for unknown tags
        return ""


def yes_no(text: str, what: str) -> bool:
    """Parse a Y/N column."""
    if text not in ("Y", "N"):
        raise ValueError(f"{what}: expected Y or N, got {text!r}")
    return text == "Y"


def parse_attributes(head: list[list[list[str]]], body: list[list[list[str]]]) -> list[dict[str, object]]:
    """Rows of Table E.1-1 as dictionaries."""
    if len(head) != 1:
        raise ValueError(f"Table E.1-1: expected one header row, got {len(head)}")
    header = tuple(cell_text(c) for c in head[0])
    if header != ATTRIBUTE_HEADER:
        raise ValueError(f"Table E.1-1: unexpected header {header}")
    rows = []
    for i, cells in enumerate(body, 1):
        if len(cells) != len(ATTRIBUTE_HEADER):
            raise ValueError(f"Table E.1-1 row {i}: {len(cells)} cells, expected {len(ATTRIBUTE_HEADER)}")
        name, notes = split_notes(cells[0])
        tag, pattern, qualifier = parse_tag(cell_text(cells[1]))
        basic = cell_text(cells[4])
        if not ACTION_CODE_RE.match(basic):
            raise ValueError(f"Table E.1-1 row {i} ({name}): unknown basic action {basic!r}")
        options = {}
        for (key, _), cell in zip(OPTION_KEYS, cells[5:], strict=True):
            code = cell_text(cell)
            if code:
                if not ACTION_CODE_RE.match(code):
                    raise ValueError(f"Table E.1-1 row {i} ({name}): unknown {key} action {code!r}")
                options[key] = code
        rows.append(
            {
                "name": name,
                "tag": tag,
                "pattern": pattern,
                "tag_condition": qualifier,
                "keyword": "" if qualifier else keyword_for(tag),
                "retired": yes_no(cell_text(cells[2]), f"row {i} Retd."),
                "in_std_iod": yes_no(cell_text(cells[3]), f"row {i} In Std. Comp. IOD"),
                "basic": basic,
                "options": options,
                "notes": notes,
            }
        )
    return rows


def parse_safe_private(head: list[list[list[str]]], body: list[list[list[str]]]) -> list[dict[str, object]]:
    """Rows of Table E.3.10-1 as dictionaries."""
    if len(head) != 1:
        raise ValueError(f"Table E.3.10-1: expected one header row, got {len(head)}")
    columns = []
    for c in head[0]:
        title = cell_text(c)
        if title in SAFE_PRIVATE_FIELDS:
            columns.append(SAFE_PRIVATE_FIELDS[title])
        elif "condition" in title.lower():
            columns.append("condition")
        else:
            raise ValueError(f"Table E.3.10-1: unexpected column {title!r}")
    for required in ("tag", "creator", "vr", "meaning"):
        if required not in columns:
            raise ValueError(f"Table E.3.10-1: no {required} column")
    rows = []
    for i, cells in enumerate(body, 1):
        if len(cells) != len(columns):
            raise ValueError(f"Table E.3.10-1 row {i}: {len(cells)} cells, expected {len(columns)}")
        raw = {col: cell_text(cell) for col, cell in zip(columns, cells, strict=True)}
        tag, _, qualifier = parse_tag(raw["tag"])
        if qualifier or not re.fullmatch(r"\([0-9A-F]{4},xx[0-9A-F]{2}\)", tag):
            raise ValueError(f"Table E.3.10-1 row {i}: unexpected private tag {raw['tag']!r}")
        rows.append(
            {
                "creator": raw["creator"],
                "tag": tag,
                "vr": raw["vr"],
                "vm": raw.get("vm", ""),
                "meaning": raw["meaning"],
                "condition": raw.get("condition", ""),
            }
        )
    return rows


def build(source: Path) -> dict[str, object]:
    """Parse SOURCE and return the JSON document."""
    data = source.read_bytes()
    collector = _TableCollector({ATTRIBUTE_TABLE_ID, SAFE_PRIVATE_TABLE_ID})
    collector.feed(data.decode("utf-8"))
    collector.close()
    for table_id in (ATTRIBUTE_TABLE_ID, SAFE_PRIVATE_TABLE_ID):
        if table_id not in collector.tables:
            raise ValueError(f"{source.name}: no {table_id.removeprefix('table_')} table found")
    edition = EDITION_RE.search(normalise(" ".join(collector.title_text)))
    if not edition:
        raise ValueError(f"{source.name}: no 'DICOM PS3.15 <edition>' in the title")
    attributes = parse_attributes(**collector.tables[ATTRIBUTE_TABLE_ID])
    safe_private = parse_safe_private(**collector.tables[SAFE_PRIVATE_TABLE_ID])
    return {
        "standard": "DICOM PS3.15",
        "edition": edition.group(1),
        "table": "E.1-1",
        "safe_private_table": "E.3.10-1",
        "source_name": source.name,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        "generated_by": "scripts/make_ps315_table.py",
        "options": [{"key": key, "column": column} for key, column in OPTION_KEYS],
        "attributes": attributes,
        "safe_private": safe_private,
    }


def dumps(document: dict[str, object]) -> str:
    """Serialise deterministically, so a re-run on the same source gives the same bytes."""
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="part15.html, or a file holding Tables E.1-1 and E.3.10-1")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="JSON file to write")
    args = parser.parse_args(argv)
    document = build(args.source)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(dumps(document), encoding="utf-8")
    print(
        f"{document['standard']} {document['edition']}: {len(document['attributes'])} attributes, "
        f"{len(document['safe_private'])} safe private attributes -> {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
