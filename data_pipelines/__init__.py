"""Data pipelines (Grain): record conversion, transforms, packing, mixtures.

Built by the data-pipeline issue; the model core does not depend on it.
"""
