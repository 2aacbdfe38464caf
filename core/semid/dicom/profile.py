"""DICOM PS3.15 Annex E: the Basic Application Level Confidentiality Profile with all its options.

The action table (``data/ps315_annex_e.json``) is generated from the standard's Table E.1-1 by
``scripts/make_ps315_table.py``; this module applies it to a pydicom Dataset, recursively through
sequences at any depth:

- ``D`` replace with a dummy value consistent with the VR (patient name and ID get the keyed
  pseudonym, UIDs the keyed remap, dates the shifted date),
- ``Z`` zero length (patient name and ID: the pseudonym, which Z allows),
- ``X`` remove, ``K`` keep (sequence contents still cleaned), ``C`` clean (dates shifted by the
  patient's keyed offset, free text by ``semid.dicom.descriptors``), ``U`` keyed UID remap;
- combinations resolve to the choice that keeps the output conformant whatever the attribute's
  type in its IOD: ``X/Z`` -> Z, anything with ``D`` -> D, ``X/Z/U*`` -> U for UIDs, a kept and
  cleaned sequence for sequences (their UIDs remapped, so references resolve), else Z.

An enabled option overrides the basic action where its column has a code; when several enabled
options apply, K beats C beats the rest. Private attributes go unless Retain Safe Private is on and
the attribute is on the standard's safe-private list (Table E.3.10-1).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from importlib import resources

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from semid import __version__
from semid.dicom import pseudonyms as ps
from semid.dicom.descriptors import clean_text, identifier_tokens
from semid.errors import InputError

OPTION_KEYS = (
    "retain_safe_private", "retain_uids", "retain_device_identity", "retain_institution_identity",
    "retain_patient_characteristics", "retain_full_dates", "retain_modified_dates", "clean_descriptors",
    "clean_structured_content", "clean_graphics",
)

#: CID 7050 De-identification Method codes (PS3.16), scheme DCM.
CID7050 = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

_TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "PN"}
_DUMMY = {
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMOUS", "DA": "19000101", "DS": "0",
    "DT": "19000101000000", "IS": "0", "LO": "ANONYMOUS", "LT": "ANONYMOUS", "PN": "ANONYMOUS",
    "SH": "ANONYMOUS", "ST": "ANONYMOUS", "TM": "000000", "UC": "ANONYMOUS", "UR": "",
    "UT": "ANONYMOUS",
}
PATIENT_NAME, PATIENT_ID = Tag(0x0010, 0x0010), Tag(0x0010, 0x0020)
#: Coded-entry attributes: they say what content is (codes from a terminology), never who it is about.
_CODED_ENTRY = {"CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion", "CodeMeaning", "LongCodeValue",
                "URNCodeValue", "ValueType", "RelationshipType", "ContinuityOfContent", "MappingResource",
                "ContextIdentifier", "TemplateIdentifier", "GraphicType", "BoundingBoxAnnotationUnits",
                "AnchorPointAnnotationUnits", "GraphicAnnotationUnits", "MeasurementUnitsCodeSequence"}


@dataclass(frozen=True)
class Options:
    """The profile's options (PS3.15 E.3). Defaults keep medical semantics: patient characteristics,
    modified (shifted) dates, cleaned descriptors."""

    retain_safe_private: bool = False
    retain_uids: bool = False
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = True
    retain_full_dates: bool = False
    retain_modified_dates: bool = True
    clean_descriptors: bool = True
    clean_structured_content: bool = False
    clean_graphics: bool = False

    def __post_init__(self) -> None:
        if self.retain_full_dates and self.retain_modified_dates:
            raise InputError("Choose one of the date options: retain_full_dates or retain_modified_dates.")

    @classmethod
    def from_names(cls, names: Iterable[str], base: Options | None = None) -> Options:
        """Options from names like ``retain_uids`` or ``no-clean_descriptors`` (dashes or underscores)."""
        values = {f.name: getattr(base or cls(), f.name) for f in fields(cls)}
        for raw in names:
            name = raw.strip().lower().replace("-", "_")
            on = not name.startswith("no_")
            name = name[3:] if not on else name
            if name not in values:
                raise InputError(f"Unknown profile option {raw!r}: use one of {', '.join(OPTION_KEYS)}.")
            values[name] = on
            if on and name == "retain_full_dates":
                values["retain_modified_dates"] = False
            if on and name == "retain_modified_dates":
                values["retain_full_dates"] = False
        return cls(**values)

    def enabled(self) -> list[str]:
        return [k for k in OPTION_KEYS if getattr(self, k)]


@dataclass(frozen=True)
class Rule:
    """One row of Table E.1-1."""

    name: str
    basic: str
    options: dict


@dataclass
class ActionTable:
    """Table E.1-1 indexed for lookup: exact tags, wildcard tags (``50xx,xxxx``), and the private rule."""

    edition: str
    source_sha256: str
    exact: dict[int, Rule]
    wildcards: list[tuple[int, int, Rule]]
    private: Rule
    safe_private: set[tuple[str, int, int]]

    @classmethod
    def load(cls) -> ActionTable:
        return _load_table()

    def rule_for(self, tag: BaseTag) -> Rule | None:
        rule = self.exact.get(int(tag))
        if rule is not None:
            return rule
        for mask, value, wild in self.wildcards:
            if int(tag) & mask == value:
                return wild
        return None

    def is_safe_private(self, creator: str, tag: BaseTag) -> bool:
        return (creator.strip().lower(), tag.group, tag.element & 0xFF) in self.safe_private


def _parse_tag_pattern(text: str) -> tuple[int, int] | None:
    """'(50xx,xxxx)' -> (mask, value) with x digits masked out; None for non-hex descriptions."""
    m = re.match(r"^\(([0-9A-Fa-fxX]{4}),([0-9A-Fa-fxX]{4})\)$", text.strip())
    if not m:
        return None
    digits = m[1] + m[2]
    mask = int("".join("0" if c in "xX" else "F" for c in digits), 16)
    value = int("".join("0" if c in "xX" else c for c in digits), 16)
    return mask, value


@lru_cache(maxsize=1)
def _load_table() -> ActionTable:
    path = resources.files("semid") / "data" / "ps315_annex_e.json"
    data = json.loads(path.read_text())
    exact: dict[int, Rule] = {}
    wildcards: list[tuple[int, int, Rule]] = []
    private = Rule("Private attributes", "X", {"retain_safe_private": "C"})
    for row in data["attributes"]:
        rule = Rule(row["name"], row["basic"], dict(row.get("options", {})))
        parsed = _parse_tag_pattern(row["tag"])
        if parsed is None:
            if "gggg" in row["tag"].lower() or "private" in row["name"].lower():
                private = rule
            continue
        mask, value = parsed
        if mask == 0xFFFFFFFF:
            exact[value] = rule
        else:
            wildcards.append((mask, value, rule))
    overrides = json.loads((resources.files("semid") / "data" / "ps315_overrides.json").read_text())
    for tag_text, change in overrides["attributes"].items():
        old = exact[_parse_tag_pattern(tag_text)[1]]
        exact[_parse_tag_pattern(tag_text)[1]] = Rule(old.name, change.get("basic", old.basic),
                                                      {**old.options, **change.get("options", {})})
    safe = set()
    for row in data.get("safe_private", []):
        parsed = re.match(r"^\(([0-9A-Fa-f]{4}),[0-9A-Fa-fxX]{2}([0-9A-Fa-f]{2})\)$", row["tag"].strip())
        if parsed:
            safe.add((row["creator"].strip().lower(), int(parsed[1], 16), int(parsed[2], 16)))
    return ActionTable(data.get("edition", ""), data.get("source_sha256", ""), exact, wildcards, private, safe)


def resolve(code: str, vr: str) -> str:
    """One action letter (D, Z, X, K, C, U) for a table code, given the element's VR."""
    code = code.replace("*", "").replace(" ", "")
    if "/" not in code:
        return code
    parts = code.split("/")
    if "D" in parts:
        return "D"
    if "U" in parts:
        # U*: keep what the instance UIDs require; a sequence (Referenced/Source Image Sequence) stays
        # and its contents are cleaned, which remaps the UIDs inside, so references still resolve
        return "U" if vr == "UI" else ("K" if vr == "SQ" else "Z")
    if "Z" in parts:
        return "Z"
    return parts[0]


def effective_code(rule: Rule, options: Options) -> str:
    """The table code after the enabled options: K beats C beats other option codes beats basic."""
    chosen = [rule.options[k] for k in options.enabled() if rule.options.get(k)]
    if not chosen:
        return rule.basic
    for preferred in ("K", "C"):
        if preferred in chosen:
            return preferred
    return chosen[-1]


@dataclass
class FileContext:
    """Per-file state: who the patient is (for pseudonyms and the date shift), and what was done."""

    patient_key: str
    identifiers: frozenset[str]
    raw_identifiers: tuple[str, ...] = ()
    counts: Counter = field(default_factory=Counter)


class Profile:
    """The confidentiality profile bound to a key and options; ``apply`` cleans one dataset in place."""

    def __init__(self, key: ps.Key, options: Options | None = None, table: ActionTable | None = None) -> None:
        self.key = key
        self.options = options or Options()
        self.table = table or ActionTable.load()
        self._temporal: list[dict[str, str]] = []

    # ------------------------------------------------------------------------------------- context

    def context_for(self, ds: Dataset) -> FileContext:
        """Identifiers of this header (for Clean Descriptors) and the patient's key for pseudonyms."""
        values: list[str] = []
        for keyword in ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
                        "PatientMotherBirthName", "AccessionNumber", "InstitutionName", "InstitutionAddress",
                        "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
                        "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord", "RequestingPhysician",
                        "StudyID", "PatientAddress", "PatientTelephoneNumbers", "StationName",
                        "InstitutionalDepartmentName", "DeviceSerialNumber", "IssuerOfPatientID"):
            value = ds.get(keyword)
            if value is None:
                continue
            items = value if isinstance(value, (list, tuple)) or getattr(value, "is_multi", False) else [value]
            for item in items:
                text = str(item)
                values.append(text.replace("^", " "))
                values.extend(p for p in text.split("^") if len(p) >= 2)
        birth = str(ds.get("PatientBirthDate", "") or "")
        if len(birth) == 8:
            values.extend([birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", f"{birth[6:]}.{birth[4:6]}.{birth[:4]}",
                           f"{birth[4:6]}/{birth[6:]}/{birth[:4]}", f"{birth[6:]}/{birth[4:6]}/{birth[:4]}"])
        patient = str(ds.get("PatientID", "") or "") or str(ds.get("PatientName", "") or "") or "unknown"
        return FileContext(patient, identifier_tokens(values), tuple(v for v in values if v.strip()))

    def patient_pseudonym(self, ctx: FileContext) -> str:
        return "SEMID-" + ps.pseudonym(self.key, "patient", ctx.patient_key)

    # --------------------------------------------------------------------------------------- apply

    def apply(self, ds: Dataset, ctx: FileContext | None = None) -> FileContext:
        """De-identify ``ds`` in place (file meta included); return the context with its action counts."""
        ctx = ctx or self.context_for(ds)
        self._clean(ds, ctx)
        self._stamp(ds, ctx)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            if "SOPInstanceUID" in ds:
                meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.ImplementationClassUID = ps.UID_ROOT + str(int.from_bytes(b"SemID-implementation", "big"))
            meta.ImplementationVersionName = f"SEMID_{__version__}".replace(".", "_")[:16]
            for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                            "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation"):
                if keyword in meta:
                    del meta[keyword]
        return ctx

    def _clean(self, ds: Dataset, ctx: FileContext, mode: str = "table") -> None:
        # a date and its time shift as one instant: each shifted value's original is kept here, so its
        # partner (shifted later) still sees it; unshifted partners are read from the dataset itself
        self._temporal.append({})
        try:
            self._clean_elements(ds, ctx, mode)
        finally:
            self._temporal.pop()

    def _clean_elements(self, ds: Dataset, ctx: FileContext, mode: str) -> None:
        """Apply the table to each element; ``mode`` says what happens to elements the table does not
        name inside a sequence being dummied (``dummy``) or cleaned (``clean``): SR content items,
        graphic annotations. At ``table`` (the default) they are kept."""
        kept_private_blocks: set[tuple[int, int]] = set()
        creators: dict[tuple[int, int], str] = {}
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private and 0x0010 <= tag.element <= 0x00FF:
                creators[(tag.group, tag.element)] = str(elem.value or "")
        for elem in list(ds):
            tag = elem.tag
            if tag.group == 0x0002:
                continue
            if tag.is_private:
                if 0x0010 <= tag.element <= 0x00FF:
                    continue  # private creators: decided once their blocks are known
                creator = creators.get((tag.group, tag.element >> 8), "")
                code = resolve(effective_code(self.table.private, self.options), elem.VR)
                if code == "C" and creator and self.table.is_safe_private(creator, tag):
                    kept_private_blocks.add((tag.group, tag.element >> 8))
                    ctx.counts["K"] += 1
                    if elem.VR == "SQ":
                        self._clean_sequence(elem, ctx, mode)
                    continue
                del ds[tag]
                ctx.counts["X"] += 1
                continue
            rule = self.table.rule_for(tag)
            if rule is None:
                if elem.VR == "SQ":
                    self._clean_sequence(elem, ctx, mode)
                elif mode != "table":
                    self._unnamed_leaf(ds, elem, mode, ctx)
                continue
            self._act(ds, elem, resolve(effective_code(rule, self.options), elem.VR), ctx)
        for (group, block) in creators:
            if (group, block) not in kept_private_blocks:
                del ds[Tag(group, block)]

    def _clean_sequence(self, elem: DataElement, ctx: FileContext, mode: str = "table") -> None:
        for item in elem.value or []:
            self._clean(item, ctx, mode)

    def _unnamed_leaf(self, ds: Dataset, elem: DataElement, mode: str, ctx: FileContext) -> None:
        """An element the table does not name, inside content being dummied or cleaned."""
        if elem.VR in ("DA", "DT", "TM") and elem.value:
            self._clean_value(ds, elem, ctx)  # dates in SR content move with the patient's offset
            ctx.counts["C"] += 1
            return
        if elem.VR not in _TEXT_VRS or elem.keyword in _CODED_ENTRY or not elem.value:
            return  # codes, numbers and structure stay: they say what the content is, not who
        if mode == "dummy":
            elem.value = _DUMMY.get(elem.VR, "ANONYMOUS")[: _max_len(elem.VR)]
            ctx.counts["D"] += 1
        else:
            self._clean_value(ds, elem, ctx)
            ctx.counts["C"] += 1

    def _act(self, ds: Dataset, elem: DataElement, code: str, ctx: FileContext) -> None:
        tag, vr = elem.tag, elem.VR
        ctx.counts[code] += 1
        if code == "X":
            del ds[tag]
        elif code == "K":
            if vr == "SQ":
                self._clean_sequence(elem, ctx)
        elif code == "U":
            elem.value = self._remap_uids(elem.value)
        elif code in ("Z", "D"):
            if tag in (PATIENT_NAME, PATIENT_ID):
                pseudo = self.patient_pseudonym(ctx)
                elem.value = pseudo.replace("-", "^", 1) if tag == PATIENT_NAME else pseudo
            elif vr == "SQ":
                if code == "Z":
                    elem.value = Sequence([])
                else:  # D: the structure stays, every free-text value inside becomes a dummy
                    self._clean_sequence(elem, ctx, "dummy")
            elif code == "Z":
                elem.value = None if vr not in _TEXT_VRS | {"AE", "CS", "UR"} else ""
            elif vr == "UI":
                elem.value = self._remap_uids(elem.value)
            elif vr in ("DA", "DT", "TM") and self.options.retain_modified_dates and elem.value:
                self._shift(ds, elem, ctx)
            elif vr in _DUMMY:
                elem.value = _DUMMY[vr][: _max_len(vr)]
            else:
                elem.value = b"" if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN") else None
        elif code == "C":
            self._clean_value(ds, elem, ctx)
        else:
            raise ValueError(f"unknown action code {code!r} for {tag}")

    def _remap_uids(self, value):
        if value is None or value == "":
            return value
        if isinstance(value, (list, tuple)) or getattr(value, "is_multi", False):
            return [ps.remap_uid(self.key, v) for v in value]
        return ps.remap_uid(self.key, value)

    def _shift(self, ds: Dataset, elem: DataElement, ctx: FileContext) -> None:
        """Move a DA, TM or DT value back by the patient's keyed offset; a date and its time
        (StudyDate + StudyTime, ...) move together as one instant, so intervals stay exact."""
        offset = ps.time_offset(self.key, ctx.patient_key)
        vr, keyword = elem.VR, elem.keyword or ""
        if getattr(elem.value, "is_multi", False) or isinstance(elem.value, (list, tuple)):
            if vr == "DT":
                elem.value = [ps.shift_dt(str(v), offset) for v in elem.value]
            else:
                elem.value = [ps.shift_datetime(str(v), None, offset)[0] if vr == "DA"
                              else ps.shift_datetime(None, str(v), offset)[1] for v in elem.value]
            return
        if vr == "DT":
            elem.value = ps.shift_dt(str(elem.value), offset)
            return
        partner_kw = keyword[:-4] + ("Time" if vr == "DA" else "Date") if keyword.endswith(("Date", "Time")) else ""
        originals = self._temporal[-1] if self._temporal else {}
        partner_value = None
        if partner_kw:
            partner_value = originals.get(partner_kw)
            if (partner_value is None and tag_for_keyword(partner_kw) is not None and partner_kw in ds
                    and not getattr(ds[partner_kw].value, "is_multi", False)):
                partner_value = str(ds[partner_kw].value or "") or None
        if keyword:
            originals[keyword] = str(elem.value)
        if vr == "DA":
            elem.value = ps.shift_datetime(str(elem.value), partner_value, offset)[0]
        else:
            elem.value = ps.shift_datetime(partner_value, str(elem.value), offset)[1]

    def _clean_value(self, ds: Dataset, elem: DataElement, ctx: FileContext) -> None:
        vr = elem.VR
        if vr == "SQ":  # C on a sequence: its free text is cleaned, like a descriptor
            self._clean_sequence(elem, ctx, "clean")
        elif vr in ("DA", "DT", "TM"):
            if self.options.retain_modified_dates and elem.value:
                self._shift(ds, elem, ctx)
            elif not self.options.retain_full_dates:
                elem.value = ""
        elif vr in _TEXT_VRS and elem.value:
            values = elem.value if getattr(elem.value, "is_multi", False) else [elem.value]
            cleaned = []
            for value in values:
                result = clean_text(str(value), ctx.identifiers)
                ctx.counts["C:text_removed"] += result.removed
                # a value cleaned down to nothing gets a dummy, so a Type 1 attribute stays valid
                cleaned.append(result.text[: _max_len(vr)] or ("CLEANED" if str(value).strip() else ""))
            elem.value = cleaned if len(cleaned) > 1 else cleaned[0]
        elif vr in ("OB", "OW", "UN") and elem.value:
            elem.value = b""  # binary content cannot be cleaned selectively: emptied
        # other VRs (numbers, codes, ages, times) carry no identity once dates are shifted: kept

    def _stamp(self, ds: Dataset, ctx: FileContext) -> None:
        """Record what was done in the dataset itself (PS3.15 E.1.1 / CID 7050)."""
        ds.PatientIdentityRemoved = "YES"
        methods = ["basic", *self.options.enabled()]
        ds.DeidentificationMethod = f"SemID {__version__} PS3.15 E.1-1 {self.table.edition}".strip()[:64]
        items = []
        for name in methods:
            code, meaning = CID7050[name]
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        if self.options.retain_modified_dates:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        elif self.options.retain_full_dates:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


def _max_len(vr: str) -> int:
    return {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64, "PN": 64 * 5,
            "SH": 16, "TM": 16, "UI": 64, "ST": 1024, "LT": 10240}.get(vr, 1 << 30)
