"""python -m zimage_client submit …: submit API workflows to a running ComfyUI (see zimage_client/submit.py)."""
import sys
from pathlib import Path

if not __package__:  # run as `python path/to/zimage_client ...`: import it as the package it is
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "zimage_client"

if __name__ == "__main__":
    try:
        from . import submit

        if len(sys.argv) < 2 or sys.argv[1] != "submit":
            print("usage: python -m zimage_client submit WORKFLOW.json [options]   (python -m zimage_client submit -h)",
                  file=sys.stderr)
            sys.exit(2)
        sys.exit(submit.main(sys.argv[2:]))
    except KeyboardInterrupt:  # a Ctrl-C before submit installs its own handling (while importing)
        print("stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(4)
