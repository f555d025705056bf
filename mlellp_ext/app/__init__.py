"""The application built on the library: the trainer (train) with its options
(config), test metrics (metrics), checkpoints and run files (checkpoint, outputs),
datasets (data), training methods and their registry (methods), backbones (models),
multi-process training (distributed, sync), the ``mlellp`` command (cli, evaluate),
the paper's experiments (reproduce, claims) and ``make run`` (demo)."""
