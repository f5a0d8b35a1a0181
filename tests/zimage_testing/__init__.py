"""Generators of the files the tests run on: tiny checkpoints in every format (`checkpoints`) and hostile ones
(`bad_inputs`). `PYTHONPATH=tests python -m zimage_testing DIR` writes both into the ComfyUI models folder DIR."""
