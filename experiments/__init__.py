"""Experiments: the `python -m experiments.run` entry point and its ml_collections recipes.

The training engine and recipes land with the training-engine issue; this package is
where they live (`experiments/run.py`, `experiments/configs/<recipe>.py`).
"""
