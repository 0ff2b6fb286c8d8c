"""Generation and a pixel stream across two jax processes, run as a script.

`python -m tests.kvjax.multiprocess RANK PORT`: with RANK 0 or 1, one of two processes (two
CPU devices each, gloo collectives, coordinator on 127.0.0.1:PORT) that together form the
mesh `data=2,model=2`; with RANK -1, the same work in one process without a mesh.
`tests/kvjax/test_sharding.py` starts all three and compares the JSON line each prints:
`mesh_parity.py`'s tiny model generating with `Full`, `ClusterKV(offload=True)` and
`FreeKV(offload=True)` (batch 4; the single process runs them without offload, which gives
the same outputs), and `mesh_vision.py`'s tiny LLaVA-OneVision encoding frames and answering
after a LiveVLM stream of pixel frames.
"""

from __future__ import annotations

import os
import sys

# Both scripts set 8 CPU devices on import; jax has not started yet, so two devices per
# process can still be asked for.
from tests.kvjax import mesh_parity, mesh_vision

os.environ["XLA_FLAGS"] = mesh_parity.cpu_xla_flags(2)

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kvjax import generate_many  # noqa: E402
from kvjax.sharding import make_mesh, shard_model  # noqa: E402


def main(rank: int, port: int) -> None:
    if rank >= 0:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
    mesh = None if rank < 0 else make_mesh("data=2,model=2")

    methods = mesh_parity.METHODS if mesh is None else mesh_parity.OFFLOADED
    outputs = generate_many(mesh_parity.tiny_model(), mesh_parity.ragged_prompts(), list(methods.values()),
                            max_new_tokens=mesh_parity.NEW, mesh=mesh)

    vlm, frames = mesh_vision.tiny_vlm(), mesh_vision.random_frames()
    answer = mesh_vision.stream_answer(vlm, frames, mesh)
    encoded = (vlm if mesh is None else shard_model(vlm, mesh)).encode_frames(frames[:3])

    print(json.dumps({
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "tokens": {name: out.tokens for name, out in zip(methods, outputs)},
        "stream_tokens": answer.tokens,
        "stream_logits": np.asarray(answer.logits).tolist(),
        "encoded": np.asarray(encoded).tolist(),
    }))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
