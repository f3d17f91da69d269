"""What multi-host serving adds to every step: the broadcast of its inputs from process 0.

    python -m benchmarks.multihost [--processes 2] [--steps 200]

Starts the processes on loopback (jax.distributed, gloo, one CPU device each) and times
`parallel.distributed.Channel` sending what process 0 sends per engine step: the model step's
inputs (token ids, AttentionMetadata, logits rows) and the sampler's (sampling arrays and the
all-ones grammar bitmask), shaped as a batch-4 decode of SmolLM2 (8 padded tokens, 64-block
tables, vocabulary 49152). Prints the compressed message sizes and the milliseconds per step
(two messages) as every process sees them.
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket
import subprocess
import sys
import time
import zlib

import numpy as np


def step_messages() -> tuple[tuple, tuple]:
    tokens, rows, blocks, words = 8, 4, 64, 49152 // 32
    meta = {"positions": np.arange(tokens, dtype=np.int32), "slot_mapping": np.arange(tokens, dtype=np.int32),
            "token_seq": np.zeros(tokens, np.int32),
            "block_tables": np.random.default_rng(0).integers(0, 64, (rows, blocks), dtype=np.int32),
            "chunk_seq": np.zeros(rows * 2, np.int32), "chunk_start": np.zeros(rows * 2, np.int32)}
    step = ((np.arange(tokens, dtype=np.int32), meta, np.arange(rows, dtype=np.int32)), [None] * 9, {})
    sampling = {"temperature": np.zeros(rows, np.float32), "seeds": np.arange(rows, dtype=np.int32),
                "token_bitmask": np.full((rows, words), -1, np.int32)}
    sample = ((sampling,), [None] * 3, {"modes": "greedy"})
    return step, sample


def run_process(process_id: int, processes: int, port: int, steps: int) -> None:
    from mistralrs_jax.parallel.distributed import SAMPLE, STEP, Channel, DistributedSettings, initialize

    initialize(DistributedSettings(f"127.0.0.1:{port}", processes, process_id, 60))
    channel = Channel()
    channel.prewarm()
    step, sample = step_messages()
    start = time.perf_counter()
    for _ in range(steps):
        if process_id == 0:
            channel.send(STEP, step)
            channel.send(SAMPLE, sample)
        else:
            channel.receive()
            channel.receive()
    elapsed = time.perf_counter() - start
    sizes = [len(zlib.compress(pickle.dumps(message, protocol=5), 1)) for message in (step, sample)]
    print(f"process {process_id}: {steps} steps, messages of {sizes[0]} + {sizes[1]} bytes compressed: "
          f"{elapsed / steps * 1000:.2f} ms per step", flush=True)
    os._exit(0)  # no shutdown handshake to wait for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.process_id is not None:
        run_process(args.process_id, args.processes, args.port, args.steps)
        return 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    children = [subprocess.Popen([sys.executable, "-m", "benchmarks.multihost", "--processes", str(args.processes),
                                  "--steps", str(args.steps), "--process-id", str(i), "--port", str(port)], env=env)
                for i in range(args.processes)]
    return max(child.wait() for child in children)


if __name__ == "__main__":
    sys.exit(main())
