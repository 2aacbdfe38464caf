"""Keyed, consistent replacements: UIDs, patient pseudonyms and per-patient date offsets.

Every replacement is an HMAC-SHA256 of the original value under the project key, so the same input
gives the same output across files, series and separate runs with the same key, and nothing can be
reversed without the key. The key comes from ``--key-file``, from ``$SEMID_KEY`` or ``$SEMID_KEY_FILE``,
or is made once and kept in the user's config folder (the run says where, never what). The key is
never written into outputs or logs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from semid.errors import InputError

#: Root for generated UIDs: "2.25." + a decimal integer from 128 hash bits (PS3.5 B.2, UUID-derived UIDs).
UID_ROOT = "2.25."
#: Dates move back by 1..3650 days per patient (intervals kept); times of day are kept.
MAX_SHIFT_DAYS = 3650


def default_key_file() -> Path:
    """Where a generated key is kept: ``$XDG_CONFIG_HOME/semid/key`` (``~/.config/semid/key``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "semid" / "key"


@dataclass(frozen=True)
class Key:
    """The secret behind every pseudonym. ``origin`` says where it came from (for messages)."""

    secret: bytes
    origin: str

    def __repr__(self) -> str:  # never show the secret, even in a debugger or a traceback
        return f"Key(origin={self.origin!r})"


def load_key(key_file: str | Path | None = None, create: bool = True) -> tuple[Key, str | None]:
    """The key from a file or the environment, or a new one kept in the config folder.

    Returns:
        (key, notice): ``notice`` is a sentence to show the user when a key was created, else None.
    """
    if key_file is None and os.environ.get("SEMID_KEY"):
        return Key(os.environ["SEMID_KEY"].strip().encode(), "the SEMID_KEY environment variable"), None
    path = Path(key_file or os.environ.get("SEMID_KEY_FILE") or default_key_file()).expanduser()
    if path.exists():
        secret = path.read_bytes().strip()
        if len(secret) < 16:
            raise InputError("The key file holds fewer than 16 bytes: use a longer secret (or delete it to make one).")
        return Key(secret, "the key file"), None
    if key_file is not None or not create:
        raise InputError("The key file does not exist: check the path, or leave --key-file out to make a key.")
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret + b"\n")
    notice = (f"No key was given, so a new one was made and kept in {path} (readable by you only); "
              "keep it to get the same pseudonyms next time, and give it with --key-file or SEMID_KEY_FILE.")
    return Key(secret, "a new key file"), notice


def _digest(key: Key, purpose: str, value: str) -> bytes:
    return hmac.new(key.secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def remap_uid(key: Key, uid: str) -> str:
    """A new UID for ``uid``: same input and key, same output; at most 44 characters."""
    uid = str(uid).strip().rstrip("\x00")
    if not uid:
        return uid
    return UID_ROOT + str(int.from_bytes(_digest(key, "uid", uid)[:16], "big"))


def pseudonym(key: Key, kind: str, value: str, length: int = 10) -> str:
    """A short upper-case hex pseudonym for ``value`` (e.g. a patient ID), stable under the key."""
    return _digest(key, kind, str(value).strip()).hex()[:length].upper()


def time_offset(key: Key, patient_id: str) -> dt.timedelta:
    """How far every date and time of this patient moves back: whole days plus seconds, keyed.

    Days are 1..MAX_SHIFT_DAYS, so dates really move; the extra seconds move times of day too, so
    neither a date nor a time keeps its original value, while every interval is kept exactly.
    """
    digest = _digest(key, "date-shift", str(patient_id).strip())
    days = 1 + int.from_bytes(digest[:4], "big") % MAX_SHIFT_DAYS
    seconds = 1 + int.from_bytes(digest[4:8], "big") % 86399
    return dt.timedelta(days=days, seconds=seconds)


def date_offset_days(key: Key, patient_id: str) -> int:
    """Whole days of the patient's offset (see ``time_offset``)."""
    return time_offset(key, patient_id).days


_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?$")


def _parse_da(value: str) -> dt.date | None:
    m = _DA.match(value.strip())
    if not m:
        return None
    try:
        return dt.date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


def _parse_tm(value: str) -> tuple[dt.time, str] | None:
    """A TM value as a time, plus its fractional-seconds text (kept as written)."""
    m = _TM.match(value.strip().replace(":", ""))
    if not m:
        return None
    hh, mm, ss = int(m[1]), int(m[2] or 0), int(m[3] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        return None
    return dt.time(hh, mm, min(ss, 59)), (m[4] or "")


def shift_datetime(date: str | None, time: str | None, offset: dt.timedelta) -> tuple[str, str]:
    """Shift a (DA, TM) pair back by ``offset`` as one instant; either may be None (absent).

    A date without a time is taken at noon; a time without a date on an arbitrary day. An unparseable
    value becomes empty (never kept).
    """
    day = _parse_da(date) if date else None
    parsed = _parse_tm(time) if time else None
    base = dt.datetime.combine(day or dt.date(2000, 1, 1), parsed[0] if parsed else dt.time(12, 0))
    moved = base - offset
    new_date = moved.strftime("%Y%m%d") if day else ("" if date else None)
    new_time = (moved.strftime("%H%M%S") + parsed[1]) if parsed else ("" if time else None)
    return new_date, new_time


def shift_da(value: str, days: int) -> str:
    """Shift a DA value (YYYYMMDD) back by ``days``; an unparseable value becomes empty (not kept)."""
    day = _parse_da(str(value))
    return (day - dt.timedelta(days=days)).strftime("%Y%m%d") if day else ""


def shift_dt(value: str, offset: dt.timedelta | int) -> str:
    """Shift a DT value (YYYYMMDDHHMMSS.FFFFFF&ZZXX) back by ``offset`` (a timedelta, or days)."""
    value = str(value).strip()
    if isinstance(offset, int):
        offset = dt.timedelta(days=offset)
    m = re.match(r"^(\d{8})(\d{2}(?:\d{2}(?:\d{2}(?:\.\d{1,6})?)?)?)?([+-]\d{4})?$", value)
    if not m:
        return ""
    new_date, new_time = shift_datetime(m[1], m[2] or None, offset)
    if not new_date:
        return ""
    return new_date + (new_time or "") + (m[3] or "")
