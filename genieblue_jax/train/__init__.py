"""Training engine: `train(config, workdir)` (trainer.py), optimizer, metrics."""
