"""The Slicer extension packaging: CMake lists, ExtensionsIndex entry, icons, module file imports.

Slicer packages only the files its CMake lists name, so a library ``.py`` or a resource missing
there breaks the installed extension while everything works from the source tree. These checks
parse the CMake files (no CMake or Slicer needed) and compare them with what is on disk and with
what the code loads.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import sys
from pathlib import Path

import pytest

from helpers import REPO  # noqa: E402

ROOT = REPO
TOP_CMAKE = ROOT / "CMakeLists.txt"
MODULE_DIR = ROOT / "DiffusionSeg"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
MODULE_FILE = MODULE_DIR / "DiffusionSeg.py"
LIBRARY_DIR = ROOT / "DiffusionSegLib"
# The library's Slicer layer the module file hands off to: the panel, the non-Qt logic, the self-test.
SLICER_LAYER = {name: LIBRARY_DIR / "slicer" / f"{name}.py" for name in ("widget", "logic", "selftest")}

# The variables SLICER.md requires in the top-level CMakeLists.txt.
EXTENSION_VARIABLES = ["EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                       "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"]

# Slicer's extension catalog entry schema (Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json):
# required keys, and every key it allows (additionalProperties is false).
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                   "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
CATALOG_SCHEMA_RE = re.compile(
    r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
    r"slicer-extension-catalog-entry-schema-v1\.0\.\d+\.json#?")

# File-scope imports the module file may have (the index reviewers' rule: no third-party imports at
# file scope; Slicer's own modules and numpy/vtk are part of Slicer).
ALLOWED_THIRD_PARTY_TOP = {"qt", "ctk", "vtk", "slicer", "numpy"}


# -- a small CMake reader ------------------------------------------------------------------------

def _strip_comments(text: str) -> str:
    out, in_quote = [], False
    for line in text.splitlines():
        kept = []
        for ch in line:
            if ch == '"':
                in_quote = not in_quote
            if ch == "#" and not in_quote:
                break
            kept.append(ch)
        out.append("".join(kept))
    return "\n".join(out)


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command name in lower case, arguments) of every top-level command call, quotes removed."""
    text = _strip_comments(path.read_text(encoding="utf-8"))
    commands = []
    pos = 0
    start_re = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(")
    while True:
        match = start_re.match(text, pos)
        if not match:
            assert not text[pos:].strip(), f"cannot parse {path.name} near: {text[pos:pos + 60]!r}"
            return commands
        depth, i, in_quote = 1, match.end(), False
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\" and in_quote:
                i += 2
                continue
            if ch == '"':
                in_quote = not in_quote
            elif not in_quote and ch == "(":
                depth += 1
            elif not in_quote and ch == ")":
                depth -= 1
            i += 1
        assert depth == 0, f"unbalanced parentheses in {path.name}"
        body = text[match.end():i - 1]
        args = [quoted if bare == "" else bare for quoted, bare in re.findall(r'"((?:[^"\\]|\\.)*)"|([^\s"]+)', body)]
        commands.append((match.group(1).lower(), args))
        pos = i


def cmake_variables(path: Path) -> dict[str, list[str]]:
    """Variables set with set(NAME values...), ${...} references to earlier variables expanded."""
    variables: dict[str, list[str]] = {}
    for name, args in cmake_commands(path):
        if name == "set" and args:
            values = []
            for value in args[1:]:
                whole = re.fullmatch(r"\$\{(\w+)\}", value)
                if whole and whole.group(1) in variables:
                    values.extend(variables[whole.group(1)])
                else:
                    values.append(re.sub(r"\$\{(\w+)\}",
                                         lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), value))
            variables[args[0]] = values
    return variables


def _expand(args: list[str], variables: dict[str, list[str]]) -> list[str]:
    out = []
    for arg in args:
        whole = re.fullmatch(r"\$\{(\w+)\}", arg)
        if whole and whole.group(1) in variables:
            out.extend(variables[whole.group(1)])
        else:
            out.append(re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), arg))
    return out


def macro_arguments(args: list[str], keywords: set[str]) -> dict[str, list[str]]:
    """Split a macro call's arguments by keyword (cmake_parse_arguments style)."""
    parsed: dict[str, list[str]] = {}
    current = None
    for arg in args:
        if arg in keywords:
            current = arg
            parsed.setdefault(arg, [])
        elif current is not None:
            parsed[current].append(arg)
    return parsed


def _one_call(commands, name):
    calls = [args for cmd, args in commands if cmd == name.lower()]
    assert len(calls) == 1, f"expected exactly one {name}() call, found {len(calls)}"
    return calls[0]


@pytest.fixture(scope="module")
def top():
    return cmake_commands(TOP_CMAKE), cmake_variables(TOP_CMAKE)


@pytest.fixture(scope="module")
def module():
    commands = cmake_commands(MODULE_CMAKE)
    variables = cmake_variables(MODULE_CMAKE)
    build = macro_arguments(_expand(_one_call(commands, "slicerMacroBuildScriptedModule"), variables),
                            {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"})
    library = macro_arguments(
        _expand([a for a in _one_call(commands, "ctkMacroCompilePythonScript")], variables),
        {"TARGET_NAME", "SCRIPTS", "RESOURCES", "SOURCE_DIR", "DESTINATION_DIR", "INSTALL_DIR", "NO_INSTALL_SUBDIR",
         "GLOBAL_TARGET"})
    return commands, variables, build, library


def _library_scripts(library) -> list[str]:
    # SCRIPTS "${LIST}" arrives as one ;-joined or space-joined string after expansion.
    return [s for arg in library["SCRIPTS"] for s in re.split(r"[;\s]+", arg) if s]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", data[16:24])


# -- top-level CMakeLists.txt ---------------------------------------------------------------------

def test_project_name_matches_catalog_entry(top):
    commands, _ = top
    assert _one_call(commands, "project")[0] == "DiffusionSeg"
    assert (ROOT / "DiffusionSeg.json").is_file(), "the ExtensionsIndex entry must be named <project>.json"


def test_extension_variables_are_set(top):
    _, variables = top
    for name in EXTENSION_VARIABLES:
        assert name in variables and any(v.strip() for v in variables[name]), f"{name} is not set"
    assert variables["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]
    assert variables["EXTENSION_HOMEPAGE"][0].startswith("https://github.com/")
    assert len(" ".join(variables["EXTENSION_DESCRIPTION"])) > 40


def test_extension_boilerplate(top):
    commands, _ = top
    calls = [(cmd, args) for cmd, args in commands]
    assert ("find_package", ["Slicer", "REQUIRED"]) in calls
    assert ("include", ["${Slicer_USE_FILE}"]) in calls
    assert ("add_subdirectory", ["DiffusionSeg"]) in calls
    assert ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]) in calls
    assert ("include", ["${Slicer_EXTENSION_CPACK}"]) in calls
    # The extension config must come after the modules are added.
    names = [(cmd, args[0] if args else "") for cmd, args in calls]
    assert names.index(("add_subdirectory", "DiffusionSeg")) < names.index(("include", "${Slicer_EXTENSION_CPACK}"))


def _raw_prefix(homepage: str) -> str:
    match = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)/?", homepage)
    assert match, f"homepage is not a GitHub repository URL: {homepage}"
    return f"https://raw.githubusercontent.com/{match.group(1)}/{match.group(2)}/"


@pytest.mark.parametrize("variable", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_image_urls_point_to_png_files_in_this_repository(top, variable):
    _, variables = top
    prefix = _raw_prefix(variables["EXTENSION_HOMEPAGE"][0])
    urls = [u for value in variables[variable] for u in value.split()]
    assert urls
    for url in urls:
        assert url.startswith(prefix), f"{url} is not a raw URL of the homepage repository"
        branch, _, relative = url[len(prefix):].partition("/")
        assert branch and relative, url
        path = ROOT / relative
        assert path.is_file(), f"{variable} points to {relative}, which is not in the repository"
        width, height = _png_size(path)
        assert width > 0 and height > 0
        assert path.stat().st_size < 500_000, f"{relative} is large ({path.stat().st_size} bytes); keep images small"
        if variable == "EXTENSION_ICONURL":
            assert (width, height) == (128, 128), "the extension icon must be 128x128"


def test_license_at_the_root():
    license_file = ROOT / "LICENSE"
    assert license_file.is_file() and license_file.stat().st_size > 100


# -- ExtensionsIndex entry ----------------------------------------------------------------------

def test_catalog_entry_fields(top):
    _, variables = top
    entry = json.loads((ROOT / "DiffusionSeg.json").read_text(encoding="utf-8"))
    assert CATALOG_REQUIRED <= set(entry), f"missing fields: {CATALOG_REQUIRED - set(entry)}"
    assert set(entry) <= CATALOG_ALLOWED, f"fields the schema does not allow: {set(entry) - CATALOG_ALLOWED}"
    assert CATALOG_SCHEMA_RE.fullmatch(entry["$schema"]), entry["$schema"]
    assert entry["category"] == variables["EXTENSION_CATEGORY"][0]
    assert entry["build_dependencies"] == ["PyTorch"] == variables["EXTENSION_DEPENDS"]
    assert isinstance(entry["scm_revision"], str) and entry["scm_revision"]
    assert entry["scm_url"].removesuffix(".git") == variables["EXTENSION_HOMEPAGE"][0].rstrip("/")
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    for key in ("build_subdirectory", "scm_type", "dicom_support_rule"):
        if key in entry:
            assert isinstance(entry[key], str)


# -- module CMakeLists.txt ----------------------------------------------------------------------

def test_scripted_module_build(module):
    _, _, build, _ = module
    assert build["NAME"] == ["DiffusionSeg"]
    assert "WITH_GENERIC_TESTS" in build
    assert "WITH_SUBDIR" not in build, "the module and its Resources/ must sit directly in qt-scripted-modules"
    assert build["SCRIPTS"] == ["DiffusionSeg.py"]
    for relative in build["SCRIPTS"] + build["RESOURCES"]:
        assert (MODULE_DIR / relative).is_file(), f"listed but missing: DiffusionSeg/{relative}"


def test_module_unittest_registered(module):
    commands, variables, _, _ = module
    calls = [_expand(args, variables) for cmd, args in commands if cmd == "slicer_add_python_unittest"]
    assert ["SCRIPT", "DiffusionSeg.py"] in calls


def test_every_library_python_file_is_packaged(module):
    _, _, _, library = module
    listed = _library_scripts(library)
    assert len(listed) == len(set(listed)), "a library file is listed twice"
    on_disk = sorted(p.relative_to(ROOT).as_posix() for p in LIBRARY_DIR.rglob("*.py")
                     if "__pycache__" not in p.parts and "bench" not in p.relative_to(LIBRARY_DIR).parts)
    missing_from_list = sorted(set(on_disk) - set(listed))
    assert not missing_from_list, f"library files not packaged (add them to DiffusionSeg/CMakeLists.txt): {missing_from_list}"
    not_on_disk = sorted(set(listed) - set(on_disk))
    assert not not_on_disk, f"listed in DiffusionSeg/CMakeLists.txt but missing on disk: {not_on_disk}"


def test_benchmark_is_not_packaged(module):
    """The benchmark (DiffusionSegLib/bench/) ships with the pip package only, never in the extension."""
    _, _, _, library = module
    bench_files = sorted(p.relative_to(ROOT).as_posix() for p in (LIBRARY_DIR / "bench").rglob("*.py"))
    assert bench_files, "the benchmark folder moved: update this test"
    packaged_bench = [f for f in _library_scripts(library) if f.startswith("DiffusionSegLib/bench/")]
    assert not packaged_bench, f"benchmark files packaged into the extension: {packaged_bench}"


def test_library_installed_next_to_the_module(module):
    _, _, _, library = module
    assert library["SOURCE_DIR"] == ["${PROJECT_SOURCE_DIR}"]
    assert library["DESTINATION_DIR"] == ["${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"]
    assert library["INSTALL_DIR"] == ["${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"]
    assert "NO_INSTALL_SUBDIR" in library


def _data_files(module) -> list[str]:
    _, variables, _, _ = module
    return variables["DIFFUSIONSEG_DATA_FILES"]


def test_bundled_models_and_sample_are_packaged(module):
    commands, variables, _, _ = module
    listed = _data_files(module)
    assert len(listed) == len(set(listed))
    model_dirs = sorted(p.parent for p in (ROOT / "Resources" / "Models").glob("*/model.json"))
    assert model_dirs, "no bundled model found"
    expected = {(d / name).relative_to(ROOT).as_posix() for d in model_dirs for name in ("model.json", "model.safetensors")}
    expected |= {m.relative_to(ROOT).as_posix() for d in model_dirs for m in d.glob("member_*.safetensors")}  # ensembles
    expected.add("Resources/Sample/ct_abdomen_sample.nii.gz")
    expected.add("Resources/Models.json")  # the model catalogue (DiffusionSegLib.models.catalogue)
    expected |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "Resources" / "Atlases").iterdir()}  # brain atlas + NOTICE
    assert expected <= set(listed), f"not packaged: {sorted(expected - set(listed))}"
    for relative in listed:
        assert (ROOT / relative).is_file(), f"listed but missing: {relative}"
    # The foreach copies them into the build tree and installs them under qt-scripted-modules.
    foreach = [args for cmd, args in commands if cmd == "foreach"]
    assert any("DIFFUSIONSEG_DATA_FILES" in args for args in foreach)
    installs = [" ".join(args) for cmd, args in commands if cmd == "install"]
    assert any("${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${data_dir}" in i for i in installs)
    configures = [" ".join(args) for cmd, args in commands if cmd == "configure_file"]
    assert any("${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${data_file}" in c and "COPYONLY" in c
               for c in configures)
    total = sum((ROOT / relative).stat().st_size for relative in listed)
    assert total < 50 * 2**20, f"packaged data is {total / 2**20:.1f} MB; the index limits repositories to 100 MB"


def test_installed_layout_matches_where_the_library_looks():
    """Library at <dir>/DiffusionSegLib, data at <dir>/Resources: the same in the source tree and installed."""
    from DiffusionSegLib.slicer import job as background
    from DiffusionSegLib.models import store as models

    assert models.BUNDLED_DIR == ROOT / "Resources" / "Models"
    assert models.BUNDLED_DIR == Path(models.__file__).resolve().parents[2] / "Resources" / "Models"
    assert background.LIBRARY_PARENT == ROOT
    from DiffusionSegLib.models import catalogue

    assert catalogue.CATALOGUE_PATH == ROOT / "Resources" / "Models.json"
    from DiffusionSegLib.pipeline import brain_atlas

    assert brain_atlas.ATLAS_PATH.parent == ROOT / "Resources" / "Atlases"


def test_every_resource_the_module_loads_is_packaged(module):
    _, variables, build, _ = module
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    loaded = {node.args[0].value for node in ast.walk(tree)
              if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "resourcePath"
              and node.args and isinstance(node.args[0], ast.Constant)}
    assert "UI/DiffusionSeg.ui" in loaded
    resources = set(build["RESOURCES"])
    for relative in loaded:
        assert f"Resources/{relative}" in resources, f"the module loads Resources/{relative} but it is not packaged"
    # Slicer takes the module icon from Resources/Icons/<ModuleName>.png.
    assert "Resources/Icons/DiffusionSeg.png" in resources
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "DiffusionSeg.png")[0] > 0
    # The sample volume the module offers ("Load sample") is one of the packaged data files.
    sample_names = {node.value.value for node in tree.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", "") == "SAMPLE_VOLUME_NAME" for t in node.targets)}
    assert sample_names == {"ct_abdomen_sample.nii.gz"}
    assert "Resources/Sample/ct_abdomen_sample.nii.gz" in _data_files(module)


# -- module file --------------------------------------------------------------------------------

def test_module_file_compiles():
    for path in [MODULE_FILE, *SLICER_LAYER.values()]:
        compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_module_file_is_a_thin_shell():
    """The classes Slicer needs by name and the two path helpers; the code lives in DiffusionSegLib.slicer."""
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes == {"DiffusionSeg", "DiffusionSegParameterNode", "DiffusionSegWidget", "DiffusionSegLogic",
                       "DiffusionSegTest"}
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"ensureLibraryImportable", "sampleVolumePath"} <= functions <= {"ensureLibraryImportable",
                                                                             "sampleVolumePath"}
    assert len(source.splitlines()) <= 160, "the module file grew: put the code in DiffusionSegLib/slicer/"
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    for name in SLICER_LAYER:
        assert f"DiffusionSegLib.slicer.{name}" in imported, f"the module file does not hand off to {name}.py"


def _file_scope_imports(tree: ast.Module) -> list[str]:
    """Top-level module names imported outside functions/classes (also inside top-level if/try)."""
    names = []

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, "relative imports do not work in a scripted module"
                names.append(node.module or "")
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
    visit(tree.body)
    return names


def test_module_file_scope_imports_are_allowed():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    imports = _file_scope_imports(tree)
    assert imports
    stdlib = set(sys.stdlib_module_names)
    for name in imports:
        top_name = name.split(".")[0]
        assert top_name in stdlib or top_name in ALLOWED_THIRD_PARTY_TOP, \
            f"file-scope import of {name!r}: import it inside the method that needs it"
    assert not any(name.startswith("DiffusionSegLib") for name in imports)


@pytest.mark.parametrize("name", sorted(SLICER_LAYER))
def test_slicer_layer_file_scope_imports_are_allowed(name):
    """The panel is imported when the module opens, logic and self-test with it: no third-party packages
    other than Slicer's own at file scope (torch & co. may not be installed yet; the library's own modules
    are checked for that by test_slicer_logic)."""
    imports = _file_scope_imports(ast.parse(SLICER_LAYER[name].read_text(encoding="utf-8")))
    stdlib = set(sys.stdlib_module_names)
    for imported in imports:
        top_name = imported.split(".")[0]
        assert top_name in stdlib or top_name in ALLOWED_THIRD_PARTY_TOP or top_name == "DiffusionSegLib", \
            f"{name}.py: file-scope import of {imported!r}: import it inside the function that needs it"


def test_module_classes_follow_the_template():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    bases = {node.name: [ast.unparse(b) for b in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert bases["DiffusionSeg"] == ["ScriptedLoadableModule"]
    assert bases["DiffusionSegWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["DiffusionSegLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["DiffusionSegTest"] == ["ScriptedLoadableModuleTest"]


def test_torch_is_never_pip_installed_by_the_module():
    # The module's dependency install lives in the Slicer layer's logic: torch through PyTorchUtils.
    installer = ast.unparse(next(node for node in ast.parse(SLICER_LAYER["logic"].read_text(encoding="utf-8")).body
                                 if isinstance(node, ast.FunctionDef) and node.name == "install_torch_with_extension"))
    assert "import PyTorchUtils" in installer and ".installTorch(" in installer
    for path in [MODULE_FILE, *SLICER_LAYER.values()]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not re.search(r"pip\S*\s+install\s+torch\b", node.value), f"{path.name}: {node.value}"


def test_module_shows_the_catalogue_figures_of_a_model():
    """catalogue_figures (the module's non-Qt logic) turns a Models.json entry into the line the model
    panel shows."""
    from DiffusionSegLib.models.catalogue import entry_for
    from DiffusionSegLib.slicer.logic import catalogue_figures as figures

    entry = entry_for("ct_abdomen_organs_2d")
    line = figures(entry)
    assert f"liver {entry['dice']['liver']:.2f}" in line
    assert f"{entry['seconds_per_volume']['cpu']['seconds']:.0f} s per volume on CPU" in line
    assert "GPU" not in line  # never measured on a GPU: no figure is made up
    gpu_entry = {**entry, "seconds_per_volume": {"gpu": {"seconds": 2.66}}}
    assert "2.7 s per volume on GPU" in figures(gpu_entry)
    assert figures(None) == "" and figures({"name": "x"}) == ""
