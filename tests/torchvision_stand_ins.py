"""Stand-ins for the torchvision modules that timm imports when it is imported (timm.layers,
timm.data, timm.utils), though its clipping code never uses them. scripts/setup.sh installs timm
without torchvision (PyPI's torchvision is built against a CUDA torch and does not load beside a
CPU-only one); tests/test_timm.py and tests/test_readme.py import timm inside
:func:`torchvision_stand_ins`."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Iterator

TORCHVISION_IMPORTED_BY_TIMM = (
    "torchvision",
    "torchvision.datasets",
    "torchvision.ops",
    "torchvision.ops.misc",
    "torchvision.transforms",
    "torchvision.transforms.functional",
)


class _Placeholder(type):
    """A stand-in class whose every attribute is another stand-in (``InterpolationMode.BILINEAR``)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Placeholder(name, (), {})
        setattr(self, name, value)
        return value


class _StandInTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the torchvision modules that timm imports at import time, as empty stand-ins."""

    def find_spec(self, name, path, target=None):
        if name in TORCHVISION_IMPORTED_BY_TIMM:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None  # torchvision.models.feature_extraction: timm falls back without it

    def create_module(self, spec):
        return _StandInModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def torchvision_is_real() -> bool:
    """Whether a torchvision is imported or installed (then no stand-in is needed)."""
    return "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None


@contextlib.contextmanager
def torchvision_stand_ins() -> Iterator[None]:
    """Within the block, stand-ins serve timm's torchvision imports where torchvision is not
    installed; after it they are out of ``sys.modules`` again. Nothing happens where it is."""
    if torchvision_is_real():
        yield
        return
    finder = _StandInTorchvision()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in TORCHVISION_IMPORTED_BY_TIMM:
            if isinstance(sys.modules.get(name), _StandInModule):
                del sys.modules[name]
