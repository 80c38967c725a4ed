"""Build the wheel, install it into a fresh virtual environment, and run the CLI from there.

The new environment sees this environment's site-packages through a .pth file, so torch and the
other dependencies are not installed twice; dsquant itself comes only from the wheel (the test
runs from a temporary directory, away from the source checkout).
"""

import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("dsquant-*.whl")
    return path


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for base, name in ((ROOT / "dsquant", "dsquant"), (ROOT / "kernels", "dsquant.kernels")):
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    missing = sorted(found - listed)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "dsquant/kernels/__init__.py" in names
    assert "dsquant/kernels/quant/__init__.py" in names
    assert any(n.startswith("dsquant/recipes/") and n.endswith(".toml") for n in names)
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would clash"
    top = [n for n in names if n.endswith("top_level.txt")]
    assert top and zipfile.ZipFile(wheel).read(top[0]).decode().split() == ["dsquant"]


def test_installed_wheel_runs_the_cli(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    target_site = Path(
        subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
    )
    # Let the new environment see this one's packages (torch, typer, ...), but not the checkout.
    ours = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    (target_site / "parent_env.pth").write_text("\n".join(ours) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target_site),
                    str(wheel)], check=True, cwd=tmp_path)
    dsquant_bin = [str(py), "-c", "from dsquant.cli import main; main()"]
    found = subprocess.run([str(py), "-c", "import dsquant, dsquant.kernels.quant as q; print(dsquant.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path)
    assert str(target_site) in found.stdout, found.stdout
    recipes = subprocess.run([*dsquant_bin, "recipes"], capture_output=True, text=True, cwd=tmp_path)
    assert recipes.returncode == 0, recipes.stderr
    assert "fp8-block" in recipes.stdout
    help_ = subprocess.run([*dsquant_bin, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert help_.returncode == 0 and "convert" in help_.stdout
