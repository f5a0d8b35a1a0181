"""Unit tests run ComfyUI and the plugin in-process, on the CPU (forced before `comfy.model_management` loads)."""
from devtools.comfy_runtime import import_comfy, import_plugin

import_comfy(cpu=True)
import_plugin()
