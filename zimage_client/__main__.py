"""python -m zimage_client submit …: submit API workflows to a running ComfyUI (see zimage_client/submit.py)."""
import sys

from . import submit

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "submit":
        print("usage: python -m zimage_client submit WORKFLOW.json [options]   (python -m zimage_client submit -h)",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(submit.main(sys.argv[2:]))
