"""Training FramePack models: the toy world, the toy family, cached datasets and the section trainer.

    toyworld.py     seeded procedural clips of moving shapes, captions, ground truth, a colour tracker
    toyfamily.py    the toy family's components in the real repos' layout; VAE training; packaging
    data.py         (video, caption) datasets with cached latents and embeddings
    trainer.py      the section trainer (flow matching on the engine's own section contexts); LoRA
                    through framepack.models.lora
    lr.py           the warmup + cosine learning-rate schedule both trainers use
    checkpoints.py  checkpoint files, RNG states, the CSV loss log
    quality.py      measurements of generated toy videos against the toy world's ground truth
    commands.py     `framepack train ...`

Importing this package is cheap; the modules load torch and friends when imported themselves.
`TRAINING_COMMANDS` (the commands that make the shipped toy model) lives in the registry, next to the
`toy` entry it describes; it is re-exported here.
"""

from framepack.registry import TRAINING_COMMANDS

__all__ = ["TRAINING_COMMANDS"]
