"""The LM head's kernels, installed as `megatron_eslm.kernels` (setup.py's package_dir).

From the project root (on sys.path under `python -m pytest` or `python -c`) this folder is also importable
as a top-level `kernels`, which would shadow the PyPI package of that name (transformers imports it). So,
imported as `kernels`, it hands over to the next `kernels` on sys.path; without one it becomes an empty
package with no file, as a namespace portion would (transformers takes that for "not installed").

Why not a namespace portion itself (no __init__.py), which any regular `kernels` further down sys.path
beats: setuptools' editable finder cannot import a namespace package mapped under a regular one
(`megatron_eslm.kernels`), so an editable install would lose the kernels.
"""
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

if __name__ == "kernels":
    _root = Path(__file__).resolve().parents[1]
    _spec = (importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if Path(entry or ".").resolve() != _root])
        or importlib.machinery.ModuleSpec("kernels", None, is_package=True))
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # before it runs: its own `from kernels.x import y` must find it
    if _spec.loader is not None:
        _spec.loader.exec_module(_module)
