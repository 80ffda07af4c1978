"""The worked examples in docstrings are executed, so they cannot go stale."""
import doctest
import importlib

import pytest

import data_pipelines.images
import data_pipelines.packing
import data_pipelines.records
import experiments.demo_data
import genieblue_jax.checksums
import genieblue_jax.evaluate
import genieblue_jax.export.hf_writer
import genieblue_jax.export.to_torch
import genieblue_jax.hf.tables
import genieblue_jax.jsonfile
import genieblue_jax.models
import genieblue_jax.models.configs
import genieblue_jax.models.llm
import genieblue_jax.models.scan
import genieblue_jax.structure
import genieblue_jax.structure.branch
import genieblue_jax.structure.config
import genieblue_jax.train.optimizer
import genieblue_jax.train.workdir_lock
import genieblue_jax.versions
import genieblue_jax.workdir


@pytest.mark.parametrize("module", [genieblue_jax.models, genieblue_jax.models.configs, genieblue_jax.models.scan,
                                    genieblue_jax.hf.tables, genieblue_jax.jsonfile, genieblue_jax.export.hf_writer,
                                    genieblue_jax.export.to_torch, genieblue_jax.models.llm,
                                    # the module, not the function `inference.generate` shadowing it
                                    importlib.import_module("genieblue_jax.inference.generate"),
                                    genieblue_jax.train.optimizer, genieblue_jax.structure,
                                    genieblue_jax.structure.config, genieblue_jax.structure.branch,
                                    data_pipelines.packing, data_pipelines.records, data_pipelines.images,
                                    experiments.demo_data, genieblue_jax.evaluate, genieblue_jax.versions,
                                    genieblue_jax.checksums, genieblue_jax.train.workdir_lock,
                                    genieblue_jax.workdir])
def test_docstring_examples(module):
    result = doctest.testmod(module, verbose=False)
    assert result.attempted > 0 and result.failed == 0
