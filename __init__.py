"""comfyui-zimage: fast, easy and measurable Z-Image in ComfyUI.

ComfyUI imports this package from custom_nodes/ and calls comfy_entrypoint(). Node code is imported
only inside ComfyUI (it needs `comfy`), so the package can also be imported by tools and tests.
"""
from pathlib import Path

WEB_DIRECTORY = "./web"
PACKAGE_DIR = Path(__file__).resolve().parent


def register_model_folders() -> None:
    """Make the models shipped in this package appear in the Z-Image loader's dropdowns with no user action."""
    from .nodes.loader import register_package_models

    register_package_models(PACKAGE_DIR / "models")


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import chinese_text, entropy_attention, example_images, kgen_probe, loader, tiled_vae

    register_model_folders()
    from server import PromptServer

    chinese_text.add_routes(PromptServer.instance.routes)

    class ZImageExtension(ComfyExtension):
        async def get_node_list(self):
            return [*loader.NODES, *tiled_vae.NODES, *entropy_attention.NODES, *kgen_probe.NODES,
                    *chinese_text.NODES, *example_images.NODES]

    return ZImageExtension()
