"""The transformers versions fs_mllm supports: the one place that knows the range and the per-version facts.

Every adapter reads the output of a family's ``get_image_features``, whose fields change between
transformers releases (5.25 made Llama 4's return the projected features as ``pooler_output``). A
version the tests never ran could smooth the wrong field without an error, so ``patch_model`` refuses
versions outside ``SUPPORTED_TRANSFORMERS`` (setup.cfg states the same range; a test checks both, and
``.ci/run`` runs the family conformance tests at both ends of it). ``FS_MLLM_UNTESTED_TRANSFORMERS=1``
lets a user try another version at their own risk, with a warning.
"""

from __future__ import annotations

import os
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_TRANSFORMERS = SpecifierSet(">=5.24,<5.26")
"""The tested range (lowest: the first release with every registered family; highest: the newest served)."""
UNTESTED_OVERRIDE = "FS_MLLM_UNTESTED_TRANSFORMERS"


def lowest_supported_transformers() -> str:
    """The range's lower bound (the release ``.ci/run`` tests beside the newest one pip serves)."""
    return next(spec.version for spec in SUPPORTED_TRANSFORMERS if spec.operator == ">=")


def installed_transformers() -> str:
    """The version string of the transformers module imported now (transformers swaps its lazy module in
    ``sys.modules`` on first use, so it is looked up at each call, never held)."""
    import transformers

    return transformers.__version__


def transformers_version() -> Version:
    """The installed transformers release (a dev or rc build compares as its release)."""
    return Version(Version(installed_transformers()).base_version)


def at_least(version: str) -> bool:
    """Whether the installed transformers is ``version`` or newer (for per-version adapter facts)."""
    return transformers_version() >= Version(version)


def check_transformers_version() -> None:
    """Refuse an untested transformers before patching (RuntimeError naming the range and the fix)."""
    installed = transformers_version()
    if installed in SUPPORTED_TRANSFORMERS:
        return
    message = (f"transformers {installed_transformers()} is outside the range fs_mllm is tested with "
               f"({SUPPORTED_TRANSFORMERS}): the image-feature outputs it smooths differ between releases")
    if os.environ.get(UNTESTED_OVERRIDE) == "1":
        warnings.warn(f"{message}; {UNTESTED_OVERRIDE}=1 is set, so patching goes on untested", stacklevel=3)
        return
    raise RuntimeError(f"{message}. Install a supported one: pip install 'transformers{SUPPORTED_TRANSFORMERS}' "
                       f"(or set {UNTESTED_OVERRIDE}=1 to try this one at your own risk)")
