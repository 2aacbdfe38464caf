"""Task configs of the SemID MONAI Label app, by the name `--conf models <name>` selects them."""

from monailabel.interfaces.config import TaskConfig

from lib.configs.deidentify import DeidentifyConfig
from lib.configs.dicomheader import DicomHeaderConfig
from lib.configs.identity import IdentityConfig
from lib.configs.segcheck import SegcheckConfig

#: Every task config the app offers; `--conf models all` (the default) loads them all.
TASK_CONFIGS: dict[str, type[TaskConfig]] = {
    "deidentify": DeidentifyConfig,
    "dicomheader": DicomHeaderConfig,
    "identity": IdentityConfig,
    "segcheck": SegcheckConfig,
}

__all__ = ["TASK_CONFIGS", "DeidentifyConfig", "DicomHeaderConfig", "IdentityConfig", "SegcheckConfig"]
