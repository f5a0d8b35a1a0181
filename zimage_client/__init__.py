"""Client side of comfyui-zimage: start a ComfyUI server, talk to it like a user's program, run the main job.

Standard library plus `websocket-client`; nothing here imports torch or ComfyUI.
"""
