"""MSL sources: parse.py reads them, lint.py checks them against the subset every backend
honours, wrap.py and wrap_<target>.py generate each target's entry wrappers. The backends and
tests use them through mlmetal.runtime.source."""
