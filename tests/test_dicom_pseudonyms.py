"""Keyed pseudonyms, UID remapping, date shifts and Clean Descriptors."""

from __future__ import annotations

import os
import stat

import pytest

from semid.dicom import pseudonyms as ps
from semid.dicom.descriptors import clean_text, identifier_tokens
from semid.errors import InputError

KEY_A = ps.Key(b"a" * 32, "test")
KEY_B = ps.Key(b"b" * 32, "test")


def test_uid_remap_is_keyed_consistent_and_valid():
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    a1, a2, b = ps.remap_uid(KEY_A, uid), ps.remap_uid(KEY_A, uid), ps.remap_uid(KEY_B, uid)
    assert a1 == a2 != b
    assert a1.startswith("2.25.") and len(a1) <= 64 and all(part.isdigit() for part in a1.split("."))
    assert ps.remap_uid(KEY_A, uid + ".1") != a1
    assert uid not in a1


def test_date_shift_keeps_intervals_per_patient():
    days = ps.date_offset_days(KEY_A, "PAT1")
    assert 1 <= days <= ps.MAX_SHIFT_DAYS and days == ps.date_offset_days(KEY_A, "PAT1")
    first, second = ps.shift_da("20200101", days), ps.shift_da("20200111", days)
    import datetime as dt

    delta = dt.datetime.strptime(second, "%Y%m%d") - dt.datetime.strptime(first, "%Y%m%d")
    assert delta.days == 10 and first != "20200101"
    assert ps.shift_dt("20200101123000.5", days).endswith("123000.5")
    assert ps.shift_da("not a date", days) == ""


def test_key_is_made_once_kept_private_and_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("SEMID_KEY", raising=False)
    monkeypatch.delenv("SEMID_KEY_FILE", raising=False)
    key, notice = ps.load_key()
    path = tmp_path / "semid" / "key"
    assert notice and str(path) in notice and key.secret.decode() not in notice
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again, notice2 = ps.load_key()
    assert again.secret == key.secret and notice2 is None
    assert key.secret.decode() not in repr(key)
    with pytest.raises(InputError, match="does not exist"):
        ps.load_key(tmp_path / "missing")


IDS = identifier_tokens(["DOE^JOHN", "MRN1234567", "ACC99881", "St Olav University Hospital", "SMITH^ANNA"])


@pytest.mark.parametrize("text,gone,kept", [
    ("Follow-up glioma left frontal, pt John Doe DOB 12/03/1961", ["John", "Doe", "1961"], ["glioma", "frontal"]),
    ("Referred by Dr Smith from St Olav University Hospital, tel +47 555 12345", ["Smith", "Olav", "555"], []),
    ("Headache. Rule out mass. Compare with 2019-05-04 exam", ["2019"], ["Headache", "mass"]),
    ("Contact anna.smith@example.org about MRN1234567", ["anna", "1234567"], []),
    ("CT HEAD WITHOUT CONTRAST", [], ["CT", "HEAD", "CONTRAST"]),
    ("Patient Nielsen has meningioma", ["Nielsen"], ["meningioma"]),
    ("Lives at Baker Street 221B", ["Baker", "221B"], []),
    ("T1 MPRAGE sag 1mm", [], ["T1", "MPRAGE", "1mm"]),
])
def test_clean_descriptors_removes_identity_keeps_medicine(text, gone, kept):
    result = clean_text(text, IDS)
    for token in gone:
        assert token not in result.text, result.text
    for token in kept:
        assert token in result.text, result.text
    assert result.removed >= len(gone) > 0 or not gone
