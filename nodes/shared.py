"""Types the node modules share, so that no node module imports another.

PromptStats is the custom io type the Chinese text encode node outputs and the k_gen report reads (its "c_text").
ZImageError is the base of the package's user-facing errors: a sentence that names the bad input and how to fix it.
"""
from __future__ import annotations

from comfy_api.latest import io

from .errors import ZImageError

__all__ = ["PromptStats", "ZImageError"]

PromptStats = io.Custom("ZIMAGE_PROMPT_STATS")  # made by the Chinese text encode node, read by the k_gen report

