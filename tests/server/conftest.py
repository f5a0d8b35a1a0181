"""Server tests talk to a real ComfyUI over HTTP and the websocket; ComfyUI and the plugin are also imported
in-process here (on the CPU), where a test reads an expected value from core or the plugin."""
from devtools.comfy_runtime import import_comfy, import_plugin

import_comfy(cpu=True)
import_plugin()
