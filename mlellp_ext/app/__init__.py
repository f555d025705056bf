"""The application built on the library: the trainer (train), datasets (data),
training methods and their registry (methods), backbones (models), multi-process
training (distributed), the ``mlellp`` command (cli), the paper's experiments
(reproduce) and ``make run`` (demo)."""
