"""Lets `python tools/X.py` import the project from a checkout that was not pip-installed."""

import sys
from pathlib import Path

root = str(Path(__file__).resolve().parent.parent)
if root not in sys.path:
    sys.path.insert(0, root)
