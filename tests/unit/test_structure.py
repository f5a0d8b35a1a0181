"""The package's structure: node modules above the pure modules, none importing another, each exporting its node
list; every error the package defines a ZImageError (one `except ZImageError` catches the user-facing ones)."""
from __future__ import annotations

import ast
import importlib
import inspect

from comfyui_zimage.nodes.shared import ZImageError
from zimage_testing.helpers import REPO_ROOT


def test_every_exception_class_the_nodes_define_is_a_zimage_error():
    defined = []
    for path in sorted((REPO_ROOT / "nodes").glob("*.py")):
        module = importlib.import_module(f"comfyui_zimage.nodes.{path.stem}")
        defined += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                    if issubclass(cls, BaseException) and cls.__module__ == module.__name__]
    names = {cls.__name__ for cls in defined}
    assert {"ZImageFileError", "PruningError", "TiledVAEError", "ExampleImageError", "TextEncodeError", "KGenError",
            "NonFiniteOutput", "TooLargeForMemory"} <= names
    assert [cls.__name__ for cls in defined if not issubclass(cls, ZImageError)] == []


NODE_MODULES = {"loader", "tiled_vae", "entropy_attention", "kgen_probe", "chinese_text", "example_images"}
PURE_MODULES = {"checkpoint_format", "kinetics", "prompt_syntax", "errors"}


def relative_imports(path) -> set[str]:
    """The sibling modules a module of nodes/ imports (`from .x import ...`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.module.split(".")[0] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def test_node_modules_sit_above_the_pure_modules_and_never_import_each_other():
    nodes_dir = REPO_ROOT / "nodes"
    graph = {p.stem: relative_imports(p) for p in nodes_dir.glob("*.py") if p.stem != "__init__"}
    assert NODE_MODULES | PURE_MODULES <= set(graph)
    assert {m: graph[m] & NODE_MODULES for m in NODE_MODULES if graph[m] & NODE_MODULES} == {}
    assert {m: graph[m] - PURE_MODULES for m in PURE_MODULES if graph[m] - PURE_MODULES} == {}
    helpers = set(graph) - NODE_MODULES  # shared, model_guard, edit, compat and the pure ones
    assert {m: graph[m] & NODE_MODULES for m in helpers if graph[m] & NODE_MODULES} == {}


def test_each_node_module_exports_its_node_list_and_the_extension_lists_them_all():
    listed = [cls for name in sorted(NODE_MODULES)
              for cls in importlib.import_module(f"comfyui_zimage.nodes.{name}").NODES]
    assert len(listed) == len(set(listed)) == 9
    source = (REPO_ROOT / "__init__.py").read_text(encoding="utf-8")
    assert all(f"*{name}.NODES" in source for name in NODE_MODULES), "the extension lists every module's NODES"
