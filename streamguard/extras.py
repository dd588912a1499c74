"""The optional parts of the install, and a clear error when one is missing.

The base install runs the worker; where detectors run comes from the extras (see pyproject.toml):
``triton-client`` for a worker that judges on Triton (no torch), ``inprocess`` for torch detectors, the
backbone conversion, training and ``triton build``, ``eval`` for the evaluation harness. Code that needs
an extra imports it lazily, and `require` (or `missing_extra`, for an import that already failed) turns its
absence into one line naming what to install, instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib.util
import sys

# The top-level modules each extra provides, in the order they are worth naming.
EXTRAS: dict[str, tuple[str, ...]] = {
    "inprocess": ("torch", "transformers", "safetensors", "onnx", "ml_dtypes", "onnxruntime"),
    "eval": ("sklearn", "scipy", "matplotlib"),
    "triton-client": ("tritonclient", "grpc"),
}
_EXTRA_OF = {module: extra for extra, modules in EXTRAS.items() for module in modules}
# What to call a module in a message: its distribution's name where that differs.
_DISTRIBUTION = {"sklearn": "scikit-learn", "ml_dtypes": "ml-dtypes", "grpc": "grpcio"}


class MissingExtra(ImportError):
    """A feature needs an extra that is not installed; the message says what to install."""

    def __init__(self, feature: str, module: str, extras: tuple[str, ...]) -> None:
        self.feature, self.module, self.extras = feature, module, extras
        super().__init__(f"{feature} needs {_DISTRIBUTION.get(module, module)}, which is not installed: "
                         f"pip install 'streamguard[{','.join(extras)}]'", name=module)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return type(self), (self.feature, self.module, self.extras)


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already (or put there by a test)
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(feature: str, *extras: str) -> None:
    """Raise `MissingExtra` naming ``extras`` when a module of any of them is not installed."""
    for extra in extras:
        for module in EXTRAS[extra]:
            if not _installed(module):
                raise MissingExtra(feature, module, extras)


def missing_extra(exc: BaseException, feature: str) -> MissingExtra | None:
    """`MissingExtra` for an import of an extra's module that failed with ``exc``; None for other errors."""
    if isinstance(exc, MissingExtra):
        return exc
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.partition(".")[0]
    extra = _EXTRA_OF.get(module)
    return MissingExtra(feature, module, (extra,)) if extra else None
