"""Multi-host serving (issue 15, part 2): two real `mistralrs-server` processes on loopback joined by
`jax.distributed` (gloo CPU collectives), process 0 serving HTTP and broadcasting every step to
process 1, which runs the same compiled programs.

Judged against a single-process server on the same model and flags: the openai client gets the
same greedy replies (one at a time and concurrently batched); process 1 ran exactly as many model
steps as process 0's engine counted; SIGTERM to process 0 stops both cleanly (exit 0); killing
process 1 makes process 0 exit with EXIT_PEER_LOST and a message naming process 1 within the
timeout."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from mistralrs_jax.parallel.distributed import EXIT_PEER_LOST

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
# f32 weights: a reply does not depend on which other rows share its step (the packed kernels' activation
# rounding does), so concurrent replies can be held to the one-at-a-time reference.
FLAGS = ["--max-seqs", "4", "--max-num-batched-tokens", "32", "--pa-ctxt-len", "1024", "--seed", "0",
         "--cpu-weights", "f32"]
TIMEOUT_S = 10  # --distributed-timeout: joining, and a silent peer
START_TIMEOUT_S = 600
PROMPTS = ["Name three colors.", "What is the capital of France?", "Write one sentence about the sea.",
           "Count from one to five."]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """Two processes of one multi-host run; their output goes to files (no pipe can fill up)."""

    def __init__(self, tmp_path: Path):
        coordinator = f"127.0.0.1:{_free_port()}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        self.logs = [tmp_path / f"process{i}.log" for i in range(2)]
        self.processes = []
        for process_id, log in enumerate(self.logs):
            command = [sys.executable, "-m", "mistralrs_jax.cli", "--port", "0", *FLAGS,
                       "--coordinator-address", coordinator, "--num-processes", "2",
                       "--process-id", str(process_id), "--distributed-timeout", str(TIMEOUT_S)]
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                                       env=env))
        self.url = self._wait_for_url()

    def log(self, process_id: int) -> str:
        return self.logs[process_id].read_text(errors="replace")

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"serving .* on (http://\S+) ", self.log(0))
            if found:
                return found.group(1)
            if any(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.5)
        self.kill()
        raise AssertionError(f"the cluster did not start:\n{self.log(0)[-3000:]}\n---\n{self.log(1)[-3000:]}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def cluster(tmp_path, smollm2_gguf_path):
    cluster = Cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.kill()


@pytest.fixture(scope="module")
def reference(smollm2_gguf_path):
    """The same model and flags in one process (this one), served on loopback."""
    from mistralrs_jax import LLM
    from mistralrs_jax.cli import build_parser
    from mistralrs_jax.cli_kwargs import build_llm_kwargs
    from server.app import create_app
    from server.serving import BackgroundServer

    llm = LLM(**build_llm_kwargs(build_parser().parse_args(FLAGS)))
    try:
        with BackgroundServer(create_app(llm, default_seed=0)) as server:
            yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
    finally:
        llm.shutdown()


def _reply(client: openai.OpenAI, prompt: str) -> str:
    response = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}],
                                              max_tokens=24, temperature=0)
    return response.choices[0].message.content


def test_two_processes_answer_as_one_and_stop_together(cluster, reference):
    client = cluster.client()
    one_by_one = [_reply(client, prompt) for prompt in PROMPTS[:2]]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched steps: several rows per broadcast step
        together = list(pool.map(lambda prompt: _reply(client, prompt), PROMPTS))
    expected = [_reply(reference, prompt) for prompt in PROMPTS]
    assert one_by_one == expected[:2]
    assert together == expected
    status = httpx.get(f"{cluster.url}/v1/status", timeout=30).json()
    steps = status["metrics"]["steps_total"]
    assert steps > 0
    # SIGTERM to process 0: it drains, tells process 1 to stop, and both exit 0.
    cluster.processes[0].send_signal(signal.SIGTERM)
    assert cluster.processes[0].wait(120) == 0, cluster.log(0)[-3000:]
    assert cluster.processes[1].wait(60) == 0, cluster.log(1)[-3000:]
    followed = re.search(r"process 0 is shutting down, after (\d+) steps", cluster.log(1))
    assert followed is not None, cluster.log(1)[-3000:]
    assert int(followed.group(1)) == steps  # process 1 ran every model step process 0 ran, no more


def test_killing_process_1_makes_process_0_exit_naming_it(cluster):
    assert _reply(cluster.client(), PROMPTS[0])  # the pair works
    cluster.processes[1].send_signal(signal.SIGKILL)
    code = cluster.processes[0].wait(TIMEOUT_S + 30)  # raises TimeoutExpired if it hangs on
    log = cluster.log(0)
    assert code == EXIT_PEER_LOST, log[-3000:]
    assert "lost contact with process 1 of 2" in log, log[-3000:]
