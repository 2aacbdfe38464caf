"""The Slicer module's files, checked without Slicer: they compile, the code and the .ui agree on
widget names, SemIDLib needs nothing Slicer lacks, and the CMake files list what exists (and
configure against a stand-in Slicer package when CMake is available).
"""

from __future__ import annotations

import ast
import py_compile
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "slicer_extension" / "SemID"
MODULE_PY = MODULE_DIR / "SemID.py"
LIB_DIR = MODULE_DIR / "SemIDLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SemID.ui"
LIB_FILES = sorted(LIB_DIR.glob("*.py"))

# What SemIDLib may import: the standard library, and what 3D Slicer's Python bundles.
LIB_ALLOWED_THIRD_PARTY = {"numpy", "pydicom"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported_top_modules(tree: ast.Module) -> set[str]:
    """Top-level names of absolute imports (relative imports stay inside the package)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", [MODULE_PY, *LIB_FILES], ids=lambda p: p.name)
def test_module_files_compile(path: Path, tmp_path: Path) -> None:
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_lib_has_the_expected_files() -> None:
    assert {p.name for p in LIB_FILES} >= {"__init__.py", "client.py", "levels.py", "series_export.py"}


@pytest.mark.parametrize("path", LIB_FILES, ids=lambda p: p.name)
def test_lib_imports_only_stdlib_numpy_pydicom(path: Path) -> None:
    imported = _imported_top_modules(_tree(path))
    foreign = {m for m in imported if m not in sys.stdlib_module_names and m not in LIB_ALLOWED_THIRD_PARTY}
    # Above all no slicer, qt, ctk or vtk: SemIDLib is what pytest tests outside Slicer.
    assert not foreign, f"{path.name} imports {sorted(foreign)}"
    assert not imported & {"slicer", "qt", "ctk", "vtk", "PythonQt"}


def _ui_widgets() -> dict[str, str]:
    """{widget name: class} of every widget in SemID.ui."""
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _self_ui_names() -> set[str]:
    """Every X in `self.ui.X` in SemID.py."""
    names = set()
    for node in ast.walk(_tree(MODULE_PY)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def test_every_widget_the_code_uses_is_in_the_ui() -> None:
    used = _self_ui_names()
    widgets = _ui_widgets()
    assert len(used) >= 10, used  # the check must actually see the code's widgets
    missing = sorted(used - set(widgets))
    assert not missing, f"SemID.py uses self.ui.{missing} which SemID.ui does not define"


def test_ui_file_is_a_slicer_module_panel() -> None:
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.findtext("class") == "SemID"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "SemID"
    widgets = _ui_widgets()
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    for name, cls in widgets.items():
        assert cls.startswith("Q") or cls in custom, f"{name}: class {cls} is not declared in <customwidgets>"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    # The brief's widgets, by kind.
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert widgets["levelSlider"] == "ctkSliderWidget"
    assert widgets["outputFolderSelector"] in ("ctkPathLineEdit", "ctkDirectoryButton")
    assert {f"preset{n}Button" for n in ("Off", "Low", "Medium", "High", "Max")} <= set(widgets)
    # Background request, results and export options of issue 7.
    assert widgets["progressBar"] == "QProgressBar" and widgets["cancelButton"] == "QPushButton"
    assert widgets["segcheckCheckBox"] == widgets["addToDatabaseCheckBox"] == "QCheckBox"
    renders = {f"{who}{view}Label" for who in ("original", "result") for view in ("Frontal", "Lateral")}
    assert {widgets[name] for name in renders | {"recordLabel", "segcheckLabel"}} == {"QLabel"}
    # Node selectors need the scene: each gets it through a mrmlSceneChanged connection.
    receivers = {c.findtext("receiver") for c in root.iter("connection") if "mrmlSceneChanged" in c.findtext("signal")}
    selectors = {n for n, c in widgets.items() if c == "qMRMLNodeComboBox"}
    assert selectors <= receivers


def test_module_imports_only_what_semidlib_exports() -> None:
    # SemID.py cannot be imported without Slicer; a typo in its SemIDLib import would only show there.
    exported = set(ast.literal_eval(_assigned(_tree(LIB_DIR / "__init__.py"), "__all__")))
    for node in ast.walk(_tree(MODULE_PY)):
        if isinstance(node, ast.ImportFrom) and node.module == "SemIDLib":
            wanted = {alias.name for alias in node.names}
            assert wanted <= exported, sorted(wanted - exported)


def _assigned(tree: ast.Module, name: str) -> str:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.unparse(node.value)
    raise AssertionError(f"{name} is not assigned")


def test_module_declares_title_logic_widget_and_test() -> None:
    tree = _tree(MODULE_PY)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"SemID", "SemIDWidget", "SemIDLogic", "SemIDTest"} <= set(classes)
    bases = {name: {ast.unparse(b) for b in node.bases} for name, node in classes.items()}
    assert "ScriptedLoadableModule" in bases["SemID"]
    assert "ScriptedLoadableModuleTest" in bases["SemIDTest"]
    assert 'self.parent.title = "De-identify"' in MODULE_PY.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------- CMake


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return match.group(1).split()


def test_cmake_lists_every_module_file() -> None:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text
    scripts = [s.replace("${MODULE_NAME}", "SemID") for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [s.replace("${MODULE_NAME}", "SemID") for s in _cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    for relative in scripts + resources:
        assert (MODULE_DIR / relative).is_file(), f"CMake lists {relative}, which does not exist"
    # A SemIDLib file missing from the list would be absent from the installed extension.
    listed = {s for s in scripts if s.startswith("SemIDLib/")}
    assert listed == {f"SemIDLib/{p.name}" for p in LIB_FILES}
    assert set(resources) == {"Resources/Icons/SemID.png", "Resources/UI/SemID.ui"}


def test_top_level_cmake_is_a_slicer_extension() -> None:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert re.search(rf"set\({variable}\s", text), variable
    for line in (
        "project(SemID)",
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(slicer_extension)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert line in text, line
    assert "add_subdirectory(SemID)" in (REPO / "slicer_extension" / "CMakeLists.txt").read_text(encoding="utf-8")


# A stand-in for Slicer's CMake package: the macros check their arguments and record what they got.
_STUB_CONFIG = r"""
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/CPack.cmake)
"""
_STUB_USE = r"""
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(M "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT M_NAME)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: NAME is missing")
  endif()
  foreach(f ${M_SCRIPTS} ${M_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule: ${f} does not exist")
    endif()
  endforeach()
  file(APPEND ${CMAKE_BINARY_DIR}/modules.txt "${M_NAME}:${M_SCRIPTS};${M_RESOURCES}\n")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(T "" "SCRIPT" "" ${ARGN})
  file(APPEND ${CMAKE_BINARY_DIR}/unittests.txt "${T_SCRIPT}\n")
endfunction()
"""
_STUB_GENERATE = r"""
foreach(v EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION
          EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
  if("${${v}}" STREQUAL "")
    message(FATAL_ERROR "${v} is empty")
  endif()
endforeach()
file(WRITE ${CMAKE_BINARY_DIR}/extension.txt "${PROJECT_NAME}|${EXTENSION_CATEGORY}|${EXTENSION_DEPENDS}")
"""


def test_cmake_configures_against_a_stand_in_slicer(tmp_path: Path) -> None:
    cmake = shutil.which("cmake")
    if cmake is None or shutil.which("cc") is None or shutil.which("c++") is None:
        pytest.skip("cmake and a C/C++ compiler are needed to configure the extension")
    stub = tmp_path / "slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(_STUB_CONFIG)
    (stub / "UseSlicer.cmake").write_text(_STUB_USE)
    (stub / "GenerateConfig.cmake").write_text(_STUB_GENERATE)
    (stub / "CPack.cmake").write_text("")
    build = tmp_path / "build"
    done = subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}", "-DBUILD_TESTING=ON"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (build / "extension.txt").read_text() == "SemID|Utilities|NA"
    modules = (build / "modules.txt").read_text().splitlines()
    assert len(modules) == 1 and modules[0].startswith("SemID:SemID.py;SemIDLib/__init__.py")
    # SemIDTest is registered with the build's tests, as Slicer's extension template does
    assert (build / "unittests.txt").read_text().split() == ["SemID.py"]


def test_help_text_describes_this_version() -> None:
    text = (MODULE_DIR / "SemID.py").read_text(encoding="utf-8")
    help_text = text[text.index("self.parent.helpText"):text.index("self.parent.acknowledgementText")]
    assert "featureless" not in help_text and "generator" in help_text and "semid serve" in help_text
