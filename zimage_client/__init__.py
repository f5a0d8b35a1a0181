"""Client side of comfyui-zimage: start a ComfyUI server, talk to it like a user's program, run the main job.

Standard library plus `websocket-client` (in requirements.txt); nothing here imports torch or ComfyUI.
From any other directory, put the plugin folder on the path first:
`PYTHONPATH=/path/to/comfyui-zimage python -m zimage_client submit WORKFLOW.json ...`.
"""
