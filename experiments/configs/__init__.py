"""Recipes: one small `get_config(arg)` file per recipe (stage1, stage2_skip, ...)."""
