"""Datastores of the SemID MONAI Label app (today: DICOMweb, e.g. Orthanc)."""

from lib.datastore.dicomweb import DEID_TAG, SemIDDicomWebDatastore, create_dicomweb_datastore

__all__ = ["DEID_TAG", "SemIDDicomWebDatastore", "create_dicomweb_datastore"]
