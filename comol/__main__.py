"""``python -m comol [overrides]``: the same entry point as ``python run.py``."""

from comol.main import main

main()
