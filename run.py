"""Entry point from a checkout: `python run.py [group=option ...] [key=value ...]` (Hydra). See README.

The same command is `python -m comol ...` or `comol-run ...` once the package is installed.
"""

from comol.main import main

if __name__ == "__main__":
    main()
