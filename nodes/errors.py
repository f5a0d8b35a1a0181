"""The base of the package's user-facing errors, in a module of its own so the pure modules beside the nodes
(checkpoint_format, which imports nothing of ComfyUI) can derive from it too; nodes/shared.py exports it."""


class ZImageError(ValueError):
    """Something a Z-Image node cannot do with what it was given, said in one sentence that names the cause and how
    to fix it (ComfyUI shows it as the node's error). A ValueError, so callers that catch ValueError (the token-count
    route) still do."""
