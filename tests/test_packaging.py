"""The installed project: its top-level packages belong to it alone.

A top-level package that another installed distribution also ships shadows one of the two:
ours was named `kernels` until transformers 5.x came to require Hugging Face's `kernels`, and
then every import of diffusers' Wan autoencoder failed on a fresh install.
"""

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shipped_top_level_packages() -> set[str]:
    """The repository's top-level packages that pyproject's package patterns ship."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    names = {p.removesuffix("*") for p in patterns}
    return {d.name for d in ROOT.iterdir() if d.name in names and (d / "__init__.py").is_file()}


def others_shipping(name: str) -> set[str]:
    return set(importlib.metadata.packages_distributions().get(name, [])) - {"streamgen"}


def test_no_installed_distribution_ships_a_top_level_package_of_ours():
    ours = shipped_top_level_packages()
    assert {"streamgen", "server", "distill", "bench"} <= ours, ours
    clashes = {name: others_shipping(name) for name in ours if others_shipping(name)}
    assert not clashes, f"installed distributions ship top-level packages of ours: {clashes}"


def test_the_clash_check_sees_a_distribution_that_ships_a_name():
    # the check above is only worth something if packages_distributions sees site-packages
    assert "torch" in others_shipping("torch")


def test_the_wheel_holds_what_an_installed_server_and_generate_read(tmp_path):
    """An installed `streamgen serve` answered / with a 404: web/ was not in the wheel."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "src"  # a copy: setuptools builds in the tree it is given
    skip = shutil.ignore_patterns(".venv", ".git", "runs", "data", "out", "build", "*.egg-info", "__pycache__",
                                  ".whl", ".pytest_cache", ".ruff_cache", ".hypothesis", "tests")  # fmt: skip
    shutil.copytree(ROOT, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
         "-w", str(tmp_path / "wheel")],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (tmp_path / "wheel").glob("streamgen-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    web = {p.relative_to(ROOT).as_posix() for p in (ROOT / "web").iterdir() if p.is_file()}
    assert web and web <= names, web - names
    assert {"streamgen/assets/sample_face.png", "streamgen/assets/models/tiny-avatar/model.json"} <= names
    assert any(n.startswith("distill/configs/") for n in names)
