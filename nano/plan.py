"""The nano recipe's settings: sizes, step counts and loss weights, one line of why each.

How each value was found, with the scores that decided it, is in docs/nano-recipe.md.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Plan:
    """Sizes and step counts; `quick` shrinks everything to prove the pipeline in a minute."""
    scenes: int = 16000  # group scenes for base and turbo, rendered and encoded once
    edit_pairs: int = 20000  # enough pairs that the edit stage cannot learn them by heart
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 48  # px: the VAE is fully convolutional, so it learns on crops, far cheaper than whole images
    decoder_steps: int = 2500  # decoder steps on windows (`decoder_crop`) of whole images' latents, encoder frozen
    decoder_batch: int = 8
    decoder_edge: float = 4.0  # extra pixel-loss weight on objects' outlines, so small stars keep their points (0: plain)
    decoder_fat: float = 0.5  # share of decoder batches whose colour footprints are widened (`fat_footprints`)
    decoder_mottle: float = 0.5  # share of decoder batches whose colours drift smoothly (`mottled_colours`)
    decoder_mottle_size: float = 0.6  # how far, at most (normalised latent units), well under two colours' distance
    decoder_crop: int = 64  # px: windows are cheaper a step than whole images (0: whole images)
    decoder_whole_steps: int = 600  # then whole pictures, whose edges the windows never show (`finetune_decoder`)
    base_steps: int = 8000  # turbo and edit start from base, so a shorter base weakens them too
    turbo_steps: int = 300  # distillation converges fast: more steps do not read better
    edit_steps: int = 3600  # what fits the CPU plan's two hours after the other stages
    batch: int = 32
    lr: float = 5e-4  # base's learning rate; turbo and edit take fractions of it
    zh_share: float = 0.52  # Chinese captions: at least half of training, without English trailing
    drop_caption: float = 0.1  # caption dropout, so CFG has an unconditional model to push against
    teacher_cfg: float = 4.0  # the guidance turbo learns to bake in (it samples at cfg 1)
    turbo_steps_sampler: int = 8  # the schedule turbo learns to cross, one step per interval
    minutes: float = 0.0  # > 0: the stages' steps are caps, each stage trains for its share of these minutes
    ema_base: float = 0.998
    edit_focus: float = 8.0  # extra loss weight where an edit changes the latent (0: the plain flow loss)
    edit_focus_objects: bool = True  # and on the objects it leaves alone, so changing a neighbour costs as much
    edit_move_share: float = 0.0  # share of edit samples that are moves (0: as drawn)
    edit_lone_share: float = 0.1  # share with one object alone (0: as drawn): naming one of several is the hard part

    @classmethod
    def quick(cls):
        return cls(scenes=48, edit_pairs=24, vae_steps=3, vae_batch=2, decoder_steps=2, decoder_whole_steps=2, decoder_batch=2,
                   base_steps=3, turbo_steps=2, edit_steps=2, batch=4)

    @classmethod
    def gpu(cls, minutes: float):
        """On a GPU a step of these tiny models costs its launches and Python, not its arithmetic, so the GPU plan
        takes big batches: 6x the data, 16x the batch, for as many steps as the time allows."""
        return cls(scenes=100_000, edit_pairs=40_000, vae_steps=4000, vae_batch=32, vae_crop=64, decoder_steps=2000,
                   decoder_batch=32, base_steps=100_000, turbo_steps=10_000, edit_steps=40_000, batch=512, lr=8e-4,
                   minutes=minutes, ema_base=0.999)

    def stage_minutes(self, name: str) -> float:
        """Each stage's share of `minutes` (base learns the most, so it gets the most)."""
        share = {"vae": 0.09, "vae-decoder": 0.04, "vae-decoder-whole": 0.02, "base": 0.5, "turbo": 0.13, "edit": 0.22}[name]
        return self.minutes * share
