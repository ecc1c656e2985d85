"""Stage 4, training: the trainer, devices, the grow job and its run directory."""
