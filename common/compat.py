"""The one place that makes ``torchvision`` importable on CPU-only installs.

torchvision 0.28.0 (the release paired with torch 2.13.0) is published as a CUDA
build only. Next to a CPU build of torch its compiled operators cannot load, and
``import torchvision`` then fails inside ``torchvision._meta_registrations`` with
"operator torchvision::nms does not exist". Everything this project uses from
torchvision (datasets, transforms, model definitions) is pure Python, so we retry
the import with that one module replaced by an empty stand-in. Detection operators
(``torchvision.ops.nms`` and friends) stay unavailable in that case, which this
project never needs.

On an install whose torchvision loads normally (CUDA, or a matching CPU build) the
first import succeeds and nothing is changed.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

_META = "torchvision._meta_registrations"


def import_torchvision() -> ModuleType:
    """Import and return ``torchvision``, working around a CPU/CUDA build mismatch."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    # Drop the half-imported package, stub the operator registrations, retry.
    for name in [
        m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")
    ]:
        del sys.modules[name]
    sys.modules[_META] = types.ModuleType(_META)
    return importlib.import_module("torchvision")
