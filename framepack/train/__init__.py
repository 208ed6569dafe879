"""Training FramePack models: the toy world, the toy family, cached datasets and the section trainer.

    toyworld.py     seeded procedural clips of moving shapes, captions, ground truth, a colour tracker
    toyfamily.py    the toy family's components in the real repos' layout; VAE training; packaging
    data.py         (video, caption) datasets with cached latents and embeddings
    trainer.py      the section trainer (flow matching on the engine's own section contexts), LoRA
    checkpoints.py  checkpoint files, RNG states, the CSV loss log
    commands.py     `framepack train ...`

Importing this package is cheap; the modules load torch and friends when imported themselves.
"""

# The commands that train and package the shipped toy model (`toy` / `toy-f1`), in order, with their
# seeds. The README's "Training and the toy model" lists them with measured times. The second `data`
# command extends the first dataset (clips 400..899; existing clips are kept), and the second run
# continues from the first run's exported (EMA) weights with a fresh warmup + cosine schedule. Then the
# VAE run continues (its own checkpoint, to 2000 steps), which rewrites the family's VAE: the data is
# encoded again into a new folder and a third run continues from the second run's weights on it; a
# fourth continues from the third on the same data, and a fifth from the fourth with 75% of its samples
# on the inverted (original) schedule; the sixth grows the fifth's weights by 4 single- and 1
# double-stream blocks (closed gates: same output at first) and trains the deeper model the same way,
# and the seventh grows the sixth's by 4 more single-stream blocks and trains it again.
TRAINING_COMMANDS = (
    "framepack train family --out runs/toy/family",
    "framepack train vae --family runs/toy/family --out runs/toy/vae --steps 500 --seed 0",
    "framepack train data --family runs/toy/family --out runs/toy/data --clips 400 --sections 1-6 --seed 0",
    "framepack train transformer --data runs/toy/data --out runs/toy/transformer --steps 5000 --seed 0",
    "framepack train data --family runs/toy/family --out runs/toy/data --clips 900 --sections 1-6 --seed 0",
    "framepack train transformer --data runs/toy/data --out runs/toy/transformer2"
    " --init runs/toy/transformer/transformer --steps 12000 --lr 3e-4 --warmup 200 --seed 1",
    "framepack train vae --family runs/toy/family --out runs/toy/vae --steps 2000 --seed 0 --resume",
    "framepack train data --family runs/toy/family --out runs/toy/data2 --clips 900 --sections 1-6 --seed 0",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer3"
    " --init runs/toy/transformer2/transformer --steps 9000 --lr 3e-4 --warmup 200 --seed 2",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer4"
    " --init runs/toy/transformer3/transformer --steps 12000 --lr 3e-4 --warmup 200 --seed 3",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer5"
    " --init runs/toy/transformer4/transformer --steps 14000 --lr 3e-4 --warmup 200 --seed 4 --schedule-weights 3,1",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer6"
    " --init runs/toy/transformer5/transformer --add-single-layers 4 --add-double-layers 1"
    " --steps 10000 --lr 3e-4 --warmup 200 --seed 5 --schedule-weights 3,1",
    "framepack train transformer --data runs/toy/data2 --out runs/toy/transformer7"
    " --init runs/toy/transformer6/transformer --add-single-layers 4"
    " --steps 8000 --lr 3e-4 --warmup 200 --seed 6 --schedule-weights 3,1",
    "framepack train package --family runs/toy/family --transformer runs/toy/transformer7/transformer",
)
