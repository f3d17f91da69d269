"""Multi-host serving (issue 15, part 2): two real `mistralrs-server` processes on loopback joined by
`jax.distributed` (gloo CPU collectives), process 0 serving HTTP and broadcasting every step to
process 1, which runs the same compiled programs.

Judged against a single-process server on the same model and flags: the openai client gets the
same greedy replies (one at a time and concurrently batched); process 1 ran exactly as many model
steps as process 0's engine counted; SIGTERM to process 0 stops both cleanly (exit 0). Three
processes of one fake CPU device each serve SmolLM2 at -tp 3 over the global mesh (every step a
gloo collective across the processes) with the single-process greedy reply; killing process 2
then makes processes 0 and 1 exit with EXIT_PEER_LOST and a message naming process 2 within the
timeout."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from multidevice_fixtures import FLAGS, PROMPTS, client_for, reference, reply, served_url  # noqa: F401 (a fixture)

from mistralrs_jax import cli
from mistralrs_jax.parallel.distributed import EXIT_PEER_LOST


REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 30  # --distributed-timeout: joining, and a silent peer (a busy 2-core machine misses 10 s heartbeats)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """The processes of one multi-host run, one fake CPU device each; their output goes to files
    (no pipe can fill up). `wait()` blocks until process 0 serves and gives its URL."""

    def __init__(self, tmp_path: Path, num_processes: int, *flags: str):
        coordinator = f"127.0.0.1:{_free_port()}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
        self.logs = [tmp_path / f"process{i}.log" for i in range(num_processes)]
        self.processes = []
        self.url = ""
        for process_id, log in enumerate(self.logs):
            command = [sys.executable, "-m", "mistralrs_jax.cli", "--port", "0", *FLAGS, *flags,
                       "--coordinator-address", coordinator, "--num-processes", str(num_processes),
                       "--process-id", str(process_id), "--distributed-timeout", str(TIMEOUT_S)]
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                                       env=env))

    def log(self, process_id: int) -> str:
        return self.logs[process_id].read_text(errors="replace")

    def wait(self) -> "Cluster":
        self.url = self._wait_for_url()
        return self

    def _wait_for_url(self) -> str:
        url = served_url(self.logs[0], self.processes)
        if url is not None:
            return url
        self.kill()
        raise AssertionError("the cluster did not start:\n" + "\n---\n".join(self.log(i)[-3000:]
                                                                            for i in range(len(self.logs))))

    def client(self):
        return client_for(self.url)

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture
def clusters(tmp_path, smollm2_gguf_path):
    """Starts clusters (`clusters(P, *flags)`, not waited for) and kills what is left of them at the end."""
    started: list[Cluster] = []

    def start(num_processes: int, *flags: str) -> Cluster:
        started.append(Cluster(tmp_path, num_processes, *flags))
        return started[-1]

    try:
        yield start
    finally:
        for cluster in started:
            cluster.kill()


@pytest.mark.parametrize("flags, message", [
    ("--num-processes 2 --process-id 2 --coordinator-address 127.0.0.1:9", "--process-id must be in [0, 2)"),
    ("--num-processes 2 --process-id 0 --coordinator-address localhost", "must be HOST:PORT"),
    ("-i --num-processes 2 --process-id 0 --coordinator-address 127.0.0.1:9", "serve HTTP only"),
])
def test_bad_multi_host_command_lines_stop_before_joining(flags, message, capsys):
    assert cli.main([*flags.split(), "plain", "-m", "x"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("mistralrs-server: error:") and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_missing_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
    """Process 1 started alone: it cannot join, and says so (exit 3) instead of JAX's abort."""
    result = subprocess.run([sys.executable, "-m", "mistralrs_jax.cli", "--coordinator-address",
                             f"127.0.0.1:{_free_port()}", "--num-processes", "2", "--process-id", "1",
                             "--distributed-timeout", "2", "plain", "-m", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_PEER_LOST, result.stderr[-3000:]
    assert "could not join the multi-host cluster at 127.0.0.1:" in result.stderr, result.stderr[-3000:]
    assert "Check failure stack trace" not in result.stderr


@pytest.mark.slow
def test_a_mesh_short_of_every_process_is_refused_by_each_before_loading(tmp_path):
    """2 processes of 2 devices: -tp 2 would leave process 1's devices out of the mesh."""
    coordinator = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    processes = [subprocess.Popen([sys.executable, "-m", "mistralrs_jax.cli", "--coordinator-address", coordinator,
                                   "--num-processes", "2", "--process-id", str(i), "--distributed-timeout", "20",
                                   "-tp", "2", "plain", "-m", str(tmp_path)], cwd=REPO_ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 1, err[-3000:]
        assert "the mesh must span every process's devices, -tp 4 here (2 per process)" in err, err[-3000:]
        assert "model path not found" not in err


@pytest.mark.slow
def test_two_processes_answer_as_one_and_stop_together(clusters, request):
    cluster = clusters(2)
    reference = request.getfixturevalue("reference")  # loads while the cluster starts
    client = cluster.wait().client()
    one_by_one = [reply(client, prompt) for prompt in PROMPTS[:2]]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched steps: several rows per broadcast step
        together = list(pool.map(lambda prompt: reply(client, prompt), PROMPTS))
    expected = [reply(reference, prompt) for prompt in PROMPTS]
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


@pytest.mark.slow
def test_tensor_parallel_over_three_processes_then_a_lost_one_stops_the_others(clusters, request):
    # SmolLM2 splits 3 ways (9 query heads, 3 KV heads): each process holds a third of every layer.
    cluster = clusters(3, "-tp", "3")
    reference = request.getfixturevalue("reference")
    client = cluster.wait().client()
    assert reply(client, PROMPTS[0]) == reply(reference, PROMPTS[0])
    mesh = httpx.get(f"{cluster.url}/v1/status", timeout=30).json()["mesh"]
    assert mesh["tensor_parallel_size"] == 3 and len(set(mesh["devices"])) == 3
    local = [row for row in mesh["per_device"] if row["weight_bytes"]]  # process 0 sees its own shards only
    assert len(local) == 1 and local[0]["kv_cache_bytes"] > 0, mesh
    cluster.processes[2].send_signal(signal.SIGKILL)
    for survivor in (0, 1):
        code = cluster.processes[survivor].wait(TIMEOUT_S + 30)  # raises TimeoutExpired if it hangs on
        log = cluster.log(survivor)
        assert code == EXIT_PEER_LOST, log[-3000:]
        assert "lost contact with process 2 of 3" in log, log[-3000:]
