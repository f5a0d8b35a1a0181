"""PYTHONPATH=tests python -m zimage_testing DIR: every tiny checkpoint and hostile file, into the models folder DIR."""
import sys
from pathlib import Path

from zimage_testing.bad_inputs import write_bad_inputs
from zimage_testing.checkpoints import write_all
from zimage_testing.helpers import unpickled_canary

target = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures-models")
for label, path in {**write_all(target), **write_bad_inputs(target, unpickled_canary(target))}.items():
    print(f"{label}: {path}")
