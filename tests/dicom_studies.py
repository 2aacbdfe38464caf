"""DICOM studies the tests build: a phantom head as a series with a hospital patient's identity (the canary
PHI that must disappear), and a corrupt study (headers that read, pixel data cut short)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

#: What ``head_study`` writes into every header besides the patient's name and id.
BIRTH_DATE, HOSPITAL, REFERRER, ACCESSION = "19610312", "QXHOSPITAL", "QXDRWHO", "QXACC99"


def head_study(image: sitk.Image, folder: Path, patient: str, patient_id: str) -> list[Path]:
    """Write ``image`` as a DICOM series of a study of its own and give it a patient's identity."""
    from semid.io import write_volume

    files = sorted(write_volume(image, folder).iterdir())
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient, patient_id, BIRTH_DATE
        ds.InstitutionName, ds.ReferringPhysicianName, ds.AccessionNumber = HOSPITAL, REFERRER, ACCESSION
        ds.StudyDescription = f"head MR {patient} {patient_id}"
        # a hospital's patient, not SemID's output (which the DICOMweb listing leaves out)
        for keyword in ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"):
            if keyword in ds:
                del ds[keyword]
        ds.save_as(path, write_like_original=False)
    return files


def corrupt_study(folder: Path, file_prefix: str = "CT") -> list[Path]:
    """Three CT slices whose headers read but whose pixel data is cut short (a truncated transfer), of
    patient QXROE^QXJOHN / QXID0815; files named ``{file_prefix}{k}.dcm``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    files = []
    for k in range(3):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "QXROE^QXJOHN", "QXID0815", BIRTH_DATE
        ds.InstanceNumber = k + 1
        ds.Rows = ds.Columns = 64
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((16, 64), np.int16).tobytes()  # a quarter of the image
        ds.is_little_endian, ds.is_implicit_VR = True, False
        path = folder / f"{file_prefix}{k}.dcm"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return files
