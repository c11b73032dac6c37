"""One process of the multi-host test: trains the micro config and prints its losses as JSON on the last line.

    python tests/train/multihost_worker.py NUM_PROCESSES PROCESS_ID LOCAL_DEVICES PORT WORKDIR
"""

import json
import sys

import jax


def main() -> None:
    num_processes, process_id, local_devices, port = (int(a) for a in sys.argv[1:5])
    workdir = sys.argv[5]
    jax.config.update("jax_num_cpu_devices", local_devices)
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                                   process_id=process_id)
    from minimax_jax.train.trainer import train
    from tests.train.helpers import micro_train_config

    config = micro_train_config(num_steps=3, global_batch_size=8, data_shards=2)
    result = train(config, workdir, echo=False)
    assert jax.device_count() == 8, jax.device_count()
    print(json.dumps({str(k): v for k, v in result.losses.items()}))


if __name__ == "__main__":
    main()
