"""The Hydra config tree (a package so that Hydra finds it as ``pkg://comol.conf`` in a wheel too)."""
