"""The data set, rendered once and encoded to latents with the trained VAE, and the batches the DiT stages draw
from it. Captions are token ids exactly as ComfyUI's Z-Image tokenizer makes them, stored as padded tables.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

from devtools.comfy_runtime import import_comfy

import_comfy()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from comfy.text_encoders.z_image import ZImageTokenizer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from . import scenes  # noqa: E402
from .models import VAE  # noqa: E402
from .plan import Plan  # noqa: E402
from .stage import compiled, file_metadata, log  # noqa: E402

PAD_ID = 151643  # Qwen's <|endoftext|>: the pad token of ComfyUI's Z-Image tokenizer


def images_to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class Captions:
    """Token ids exactly as ComfyUI's Z-Image tokenizer makes them (chat template included)."""

    def __init__(self):
        self.tokenizer = ZImageTokenizer()
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            tokens = self.tokenizer.tokenize_with_weights(text)["qwen3_4b"]
            self.cache[text] = [int(t[0]) for batch in tokens for t in batch]
        return self.cache[text]

    def table(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts' ids as one int32 table, right-padded with the pad token, and their lengths."""
        ids = [self.ids(t) for t in texts]
        table = torch.full((len(ids), max(len(i) for i in ids)), PAD_ID, dtype=torch.int32)
        for k, row in enumerate(ids):
            table[k, :len(row)] = torch.tensor(row, dtype=torch.int32)
        return table, torch.tensor([len(i) for i in ids], dtype=torch.int32)


@torch.no_grad()
def build_dataset(work: Path, plan: Plan, vae: VAE, device, seed: int, compile_encoder: bool = False) -> tuple[Path, dict]:
    """The data set's file in `work`, built unless a finished one is there, and its state (the seconds it took)."""
    path = work / "data.safetensors"
    if path.exists():
        return path, json.loads(file_metadata(path).get("state", "{}"))
    started = time.time()
    captions = Captions()
    encode = compiled(vae.encode, compile_encoder)  # encoding is most of this stage
    rng = random.Random(seed)
    log(f"data: rendering and encoding {plan.scenes} scenes and {plan.edit_pairs} edit pairs")

    class Encoded(list):
        """Pictures in, latents out: encoded 64 at a time as they arrive, so the pictures are never all held."""

        def __init__(self):
            super().__init__()
            self.pending = []

        def add(self, image):
            self.pending.append(image)
            if len(self.pending) == 64:
                self.flush()

        def flush(self):
            if self.pending:
                mean, _ = encode(images_to_tensor(self.pending).to(device))
                self.append(mean.half().cpu())
                self.pending = []

        def tensor(self):
            self.flush()
            return torch.cat(self)

    texts_zh, texts_en, latents = [], [], Encoded()
    for _ in range(plan.scenes):
        scene = scenes.random_group_scene(rng, held_out=False)
        latents.add(scenes.render(scene))
        texts_zh.append(scenes.caption(scene, "zh", rng))
        texts_en.append(scenes.caption(scene, "en", rng))
    latents = latents.tensor()
    edit_zh, edit_en, edit_kind, edit_objects, before, after = [], [], [], [], Encoded(), Encoded()
    for _ in range(plan.edit_pairs):
        pair = scenes.random_edit_pair(rng)
        edit_kind.append(scenes.EDIT_KINDS.index(pair.kind))
        edit_objects.append(len(pair.before.items))
        before.add(scenes.render(pair.before))
        after.add(scenes.render(pair.after))
        edit_zh.append(scenes.edit_instruction(pair, "zh", rng))
        edit_en.append(scenes.edit_instruction(pair, "en", rng))
    edit_before, edit_after = before.tensor(), after.tensor()

    tensors = {"latents": latents, "edit_before": edit_before, "edit_after": edit_after,
               "edit_kind": torch.tensor(edit_kind, dtype=torch.uint8),
               "edit_objects": torch.tensor(edit_objects, dtype=torch.uint8)}
    for name, texts in (("zh", texts_zh), ("en", texts_en), ("edit_zh", edit_zh), ("edit_en", edit_en), ("empty", [""])):
        tensors[f"{name}.ids"], tensors[f"{name}.len"] = captions.table(texts)
    examples = {"zh": texts_zh[:5], "en": texts_en[:5], "edit_zh": edit_zh[:5], "edit_en": edit_en[:5]}
    state = {"seconds": time.time() - started}
    save_file(tensors, str(path), metadata={"examples": json.dumps(examples, ensure_ascii=False),
                                            "state": json.dumps(state)})
    log(f"data: {len(captions.cache)} distinct captions; latent std {latents.float().std():.3f}")
    return path, state


def used_token_ids(data: dict) -> list[int]:
    ids = set()
    for key in ("zh.ids", "en.ids", "edit_zh.ids", "edit_en.ids", "empty.ids"):
        ids.update(int(i) for i in torch.unique(data[key]))
    return sorted(ids)


class Batches:
    """Caption batches whose lengths round up to the same multiple of 32, so per-sample padding equals inference's.
    Gathered with whole-table indexing: a per-sample loop cost a GPU step of batch 512 a third of its time."""

    def __init__(self, data: dict, prefix: str, plan: Plan, p: np.ndarray | None = None):
        self.plan, self.p = plan, p  # p: each sample's probability of being drawn (None: evenly)
        self.n = data[f"{prefix}zh.ids"].shape[0]
        tables = [data[f"{prefix}zh.ids"], data[f"{prefix}en.ids"], data["empty.ids"]]
        width = max(t.shape[1] for t in tables)
        pad = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD_ID) for t in tables]
        self.ids = torch.cat(pad)  # rows: zh captions, en captions, then the empty caption
        self.lens = torch.cat([data[f"{prefix}zh.len"], data[f"{prefix}en.len"], data["empty.len"]]).long()

    def pick(self, step: int, seed: int, batch: int):
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, self.n, size=batch) if self.p is None else rng.choice(self.n, size=batch, p=self.p)
        zh = rng.random(batch) < self.plan.zh_share
        drop = rng.random(batch) < self.plan.drop_caption
        rows = torch.from_numpy(np.where(drop, 2 * self.n, np.where(zh, idx, self.n + idx)))
        lens = self.lens[rows]
        bucket = (lens + 31) // 32
        keep = bucket == bucket[0]
        # every batch of a bucket has the same width (the DiT pads captions to 32 tokens anyway, and the causal encoder
        # leaves the captions' own states alone), so a compiled model sees one shape and never recompiles
        width = min(self.ids.shape[1], 32 * int(bucket[0]))
        return torch.from_numpy(idx)[keep], self.ids[rows[keep], :width].long(), lens[keep]


def edit_sample_weights(data: dict, move_share: float, lone_share: float = 0.0) -> np.ndarray | None:
    """Per edit pair, its probability of being drawn, so that moves make up `move_share` of the samples and pairs of
    one object alone `lone_share` (each 0: as drawn; the two are about independent in the data set); None: evenly."""
    w, applied = np.ones(data["edit_zh.ids"].shape[0]), False
    for key, pick, share in (("edit_kind", lambda v: v == scenes.EDIT_KINDS.index("move"), move_share),
                             ("edit_objects", lambda v: v == 1, lone_share)):
        if share <= 0:
            continue
        if key not in data:
            raise ValueError(f"this data set records no {key} (built by an older recipe): rebuild it, or leave the plan's "
                             "edit shares as drawn")
        chosen = pick(data[key].cpu().numpy())
        if chosen.any() and not chosen.all():
            w *= np.where(chosen, share / chosen.sum(), (1 - share) / (~chosen).sum())
            applied = True
    return w / w.sum() if applied else None


