"""DICOM de-identification: the PS3.15 header profile, consistent UIDs and dates, burned-in text."""
