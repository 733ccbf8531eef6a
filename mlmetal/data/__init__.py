"""Data shipped inside the package, read with importlib.resources (works from a wheel or a zip)."""

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def mtgp32_params() -> tuple[dict, ...]:
    """The 200 MTGP32 parameter sets of mtgp32dc_params_fast_11213 (licence: LICENSE-MTGP32.txt)."""
    text = resources.files(__name__).joinpath("mtgp32dc_params_fast_11213.json").read_text()
    return tuple(json.loads(text)["sets"])
