"""A plain (non-editable) install ships every module of the source tree, kernels/ as megatron_eslm.kernels,
and nothing named `kernels` is importable from the project root (it would shadow PyPI's `kernels`)."""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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


def run_from_root(*statements: str, then: Path | None = None) -> subprocess.CompletedProcess:
    """`python -c` in a fresh interpreter with the project root first on sys.path (as `python -m pytest`
    run from it has), and `then` right after it."""
    setup = f"import sys; sys.path[:0] = {[str(ROOT), *([str(then)] if then else [])]!r}"
    return subprocess.run([sys.executable, "-c", "\n".join([setup, *statements])], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_root_kernels_folder_does_not_shadow_a_kernels_package(tmp_path):
    """kernels/ at the project root is megatron_eslm.kernels only: imported as `kernels` it hands over to
    the next `kernels` on sys.path (a stub here; PyPI's, which transformers imports, where installed), or
    is an empty package without a file. transformers' models and megatron_eslm.kernels import from the root."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("STUB = True\n")
    stub = run_from_root("import kernels", "assert kernels.STUB, kernels.__file__", then=tmp_path)
    assert stub.returncode == 0, stub.stderr
    plain = run_from_root("from transformers import GPT2LMHeadModel, LlamaForCausalLM",
                          "import megatron_eslm.kernels.lm_head_torch",
                          "import kernels",
                          f"assert not str(getattr(kernels, '__file__', '')).startswith({str(ROOT / 'kernels')!r})",
                          "assert not hasattr(kernels, 'lm_head_torch') and not hasattr(kernels, 'STUB')")
    assert plain.returncode == 0, plain.stderr


def test_nothing_imports_a_top_level_kernels():
    importing = re.compile(r"^\s*(import|from)\s+kernels\b", re.MULTILINE)
    offenders = [str(path.relative_to(ROOT)) for folder in ("megatron_eslm", "tools", "tests")
                 for path in (ROOT / folder).rglob("*.py") if importing.search(path.read_text())]
    assert offenders == []
