"""A plain (non-editable) install ships every module of the source tree, kernels/ as megatron_eslm.kernels."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module(tmp_path):
    source_tree = tmp_path / "src"  # a copy: setuptools builds inside the tree it is given
    for name in ("megatron_eslm", "kernels"):
        shutil.copytree(ROOT / name, source_tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.py", source_tree)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source_tree)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("megatron_eslm-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "megatron_eslm").rglob("*.py")}
    source |= {"megatron_eslm/kernels/" + p.name for p in (ROOT / "kernels").glob("*.py")}
    assert source - shipped == set()
    assert not any(name.startswith("kernels/") for name in shipped)  # never a bare top-level `kernels`
