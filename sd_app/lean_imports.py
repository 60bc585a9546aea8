"""Import policy of a short-lived ``sd-app generate`` process: load only the library code the path runs.

Two things make a cold ``import`` of diffusers' model classes cost seconds that a one-image process never
uses, and neither is switchable through the libraries' own options (diffusers 0.42, transformers 5.24):

- Package ``__init__`` files that import every sibling: ``diffusers.models.unets`` imports all eleven
  U-Nets and, through ``unet_2d_blocks``, ``diffusers.models.transformers`` imports every transformer
  model (Flux, SD3, video models...), though SD 1.x needs two files of each. Here these packages are
  created without running their ``__init__``; their submodules import as usual, and the ``__init__``
  runs in full the first time anyone asks the package for a name it does not have yet
  (``from diffusers.models.unets import UNet1DModel`` still works), so nothing changes but when. The same
  holds for ``scipy.stats``, which diffusers' schedulers import at import time for an optional schedule.
- ``peft``: a test-only dependency of sd-app (pyproject ``[test]``) that diffusers imports whenever it is
  installed, and with it all of transformers' model machinery. sd-app applies LoRA with its own code
  (``pipelines.models.lora``), so a generate process blocks it the standard way (``sys.modules[name] =
  None``: ``import peft`` raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None),
  exactly as if it were not installed, which is what a user's installation looks like.

This is process-wide and for the application's own entry points only; the library (``pipelines``)
never changes the import system.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Iterable
from types import ModuleType

# Packages whose __init__ imports every sibling module; SD 1.x needs few of them. scipy.stats: diffusers'
# Euler and DPM-Solver schedulers ``import scipy.stats`` at import time for an optional beta schedule.
DEFERRED_PACKAGES = (
    "diffusers.models.unets",
    "diffusers.models.transformers",
    "diffusers.models.autoencoders",
    "scipy.stats",
)
# Installed only for tests; diffusers imports it (and all of transformers' models) when present.
UNUSED_PACKAGES = ("peft",)


class _DeferredInitLoader(importlib.abc.Loader):
    """Creates the package module (``__path__`` set, so submodules import) and runs its ``__init__`` on the
    first lookup of a name the package does not have."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        loader = self.loader

        def __getattr__(name: str) -> object:  # noqa: N807 - PEP 562 module __getattr__
            del module.__dict__["__getattr__"]
            loader.exec_module(module)  # the real __init__, in the module's own namespace
            return getattr(module, name)

        module.__getattr__ = __getattr__  # type: ignore[method-assign]


class DeferredInitFinder(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that gives the named packages a deferred ``__init__``."""

    def __init__(self, packages: Iterable[str]) -> None:
        self.packages = frozenset(packages)

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.packages:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # type: ignore[arg-type]
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return None  # not found or not a package: the normal finders answer
        spec.loader = _DeferredInitLoader(spec.loader)
        return spec


def use_lean_imports(
    deferred: Iterable[str] = DEFERRED_PACKAGES, unused: Iterable[str] = UNUSED_PACKAGES
) -> None:
    """Install the policy for this process (idempotent). Packages already imported are left as they are."""
    for name in unused:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment] - the documented import block
    pending = [name for name in deferred if name not in sys.modules]
    if pending and not any(isinstance(finder, DeferredInitFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, DeferredInitFinder(pending))
