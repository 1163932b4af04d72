"""The build lists what it ships, folder by folder.

Every folder of the package has a meson.build that names its files; a file nobody listed would be
missing from the wheel (and from editable installs), a listed file that does not exist breaks the
build. The installed set of a configured build is compared with the folders: the product ships
every source and template and nothing from tests/; a ``-Dane_fake=true`` build adds the ANE
runtime built against the fake framework, and the fake framework itself is never installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiers import unavailable

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "rustane"
SHIPPED = (".py", ".mil", ".pyx")


def _strings(build: Path) -> list[str]:
    text = "\n".join(line.split("#", 1)[0] for line in build.read_text().splitlines())
    return re.findall(r"'([^']*)'", text)


def _named(build: Path) -> set[Path]:
    """Files a meson.build names (quoted strings with a file suffix), resolved in its folder."""
    return {(build.parent / s).resolve() for s in _strings(build) if re.search(r"\.(py|pyx|mil|c|m|S|h)$", s)}


def _subdirs(build: Path) -> list[Path]:
    text = "\n".join(line.split("#", 1)[0] for line in build.read_text().splitlines())
    return [(build.parent / d).resolve() for d in re.findall(r"subdir\(\s*'([^']+)'\s*\)", text)]


def _package_files() -> set[Path]:
    return {p.resolve() for p in PACKAGE.rglob("*") if p.suffix in SHIPPED and "__pycache__" not in p.parts}


def test_every_source_is_listed_in_its_folders_meson_build():
    missing = []
    for f in sorted(_package_files()):
        build = f.parent / "meson.build"
        if not build.is_file() or f not in _named(build):
            missing.append(str(f.relative_to(REPO)))
    assert not missing, ("not listed in the meson.build of their folder (they would not ship):\n  "
                         + "\n  ".join(missing))


def test_everything_listed_exists_and_every_folder_is_reached():
    builds = sorted(REPO.glob("meson.build")) + sorted(PACKAGE.rglob("meson.build")) + \
        sorted((REPO / "csrc").rglob("meson.build")) + sorted((REPO / "tests").rglob("meson.build"))
    absent = [f"{b.relative_to(REPO)}: {p.relative_to(REPO)}" for b in builds for p in sorted(_named(b)) if not p.exists()]
    assert not absent, "listed but missing:\n  " + "\n  ".join(absent)
    reached, todo = set(), [REPO]
    while todo:
        d = todo.pop()
        reached.add(d)
        b = d / "meson.build"
        assert b.is_file(), f"subdir() names {d.relative_to(REPO)}, which has no meson.build"
        todo += _subdirs(b)
    folders = {f.parent for f in _package_files()}
    assert not folders - reached, f"folders no subdir() reaches: {sorted(str(f) for f in folders - reached)}"
    for b in builds:
        assert "install_subdir" not in b.read_text(), f"{b.relative_to(REPO)} installs a whole folder"


def test_the_checks_catch_an_unlisted_and_a_phantom_file(tmp_path):
    build = tmp_path / "meson.build"
    build.write_text("py.install_sources(\n  'a.py',  # 'b.py' only in a comment\n  'gone.py',\n  subdir: 'x',\n)\n")
    (tmp_path / "a.py").write_text("")
    (tmp_path / "b.py").write_text("")
    named = _named(build)
    assert (tmp_path / "a.py").resolve() in named and (tmp_path / "b.py").resolve() not in named
    assert not (tmp_path / "gone.py").exists() and (tmp_path / "gone.py").resolve() in named


def _installed(tmp_path: Path, *options: str) -> set[str]:
    """Package-relative paths ``meson install`` would write for a build configured with options."""
    meson = shutil.which("meson")
    if meson is None:
        unavailable("meson is not installed (pip install '.[test]')")
    build = tmp_path / ("build" + "".join(o.replace("=", "_") for o in options))
    r = subprocess.run([meson, "setup", str(build), str(REPO), *options, "-Dpython.install_env=auto"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and "gnustep" in (r.stdout + r.stderr).lower():
        unavailable(f"the -Dane_fake=true build needs GNUstep: {r.stdout[-500:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([meson, "introspect", str(build), "--installed"], capture_output=True, text=True, check=True)
    out = set()
    for dest in json.loads(r.stdout).values():
        parts = Path(dest).parts
        assert "rustane" in parts, f"installs outside the package: {dest}"
        out.add("/".join(parts[parts.index("rustane"):]))
    return out


def _expected() -> set[str]:
    return {str(p.relative_to(REPO)) for p in _package_files() if p.suffix in (".py", ".mil")}


def _strip_ext(paths: set[str]) -> set[str]:
    """Extension modules by module name (rustane/_native.cpython-311-...so -> rustane/_native)."""
    return {re.sub(r"\.(cpython|abi3|cp)[^/]*\.(so|pyd)$|\.(so|pyd)$", "", p) for p in paths}


def test_the_product_installs_the_package_and_nothing_else(tmp_path):
    installed = _installed(tmp_path)
    ext = {p for p in installed if not p.endswith((".py", ".mil"))}
    assert installed - ext == _expected()
    want = {"rustane/_native", "rustane/_cpu"} | ({"rustane/_ane"} if sys.platform == "darwin" else set())
    assert _strip_ext(ext) == want
    # the fake framework's evaluator is package Python (rustane/backends/ane/meson.build says why);
    # the fake framework itself never ships
    assert not any("fake" in p for p in installed - {"rustane/backends/ane/fake.py"})


@pytest.mark.skipif(sys.platform == "darwin", reason="the fake framework is the Linux stand-in for the ANE")
def test_the_fake_build_adds_the_runtime_but_never_installs_the_fake_framework(tmp_path):
    if shutil.which("gnustep-config") is None:
        unavailable("GNUstep is not installed (apt-get install gnustep-make libgnustep-base-dev libobjc-12-dev)")
    installed = _installed(tmp_path, "-Dane_fake=true")
    ext = {p for p in installed if not p.endswith((".py", ".mil"))}
    assert installed - ext == _expected()
    assert _strip_ext(ext) == {"rustane/_native", "rustane/_cpu", "rustane/_ane"}
