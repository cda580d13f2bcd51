"""What the installed distribution claims: every package of the tree, and no generic top-level name."""

from __future__ import annotations

import tomllib

from conftest import ROOT


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_and_kernels_is_mapped_under_minitorch_peft() -> None:
    config = _setuptools()
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "minitorch_peft").rglob("__init__.py")}
    on_disk.add("minitorch_peft.kernels")  # the top-level folder kernels/, installed under the package
    assert set(config["packages"]) == on_disk
    assert config["package-dir"] == {"minitorch_peft.kernels": "kernels"}


def test_no_top_level_kernels_or_cli_module_is_installed() -> None:
    config = _setuptools()
    assert "py-modules" not in config
    assert all(p.split(".")[0] == "minitorch_peft" for p in config["packages"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"minitorch-peft": "minitorch_peft.cli:run"}


def test_the_engine_imports_its_kernels_by_the_installed_name() -> None:
    """`import kernels` would load a second copy of the modules (two QuantState classes) or another package."""
    offenders = []
    for path in [*(ROOT / "minitorch_peft").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import kernels", "from kernels")):
                offenders.append(f"{path.relative_to(ROOT)}: {stripped}")
    assert not offenders
