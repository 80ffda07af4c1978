"""One of N processes of a multi-host run on localhost (gloo collectives).

    python -m tests.train.multiprocess_worker PORT NUM_PROCESSES PROCESS_ID DEVICES WORKDIR
"""
import os
import sys


def main(port, num_processes, process_id, devices, workdir):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(num_processes), process_id=int(process_id))
    from genieblue_jax.train import trainer
    from tests.train.conftest import tiny_config
    c = tiny_config(**{"mesh.data": -1, "data.host_sharding": "rows"})
    trainer.train(c, workdir)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
