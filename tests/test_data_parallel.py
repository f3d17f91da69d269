"""Data-parallel replicas (issue 15, part 3): a real `mistralrs-server --data-parallel-size 2` on two
fake CPU devices (XLA_FLAGS set before JAX starts, so in a subprocess) against one engine in this
process on the same model and flags.

The openai client's concurrent greedy replies equal the one-engine replies; both replicas got
requests (/v1/status and /metrics per replica); each replica's weights and KV cache sit on its own
device, and the two devices differ (the per-device bytes of /v1/status's mesh report)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from multidevice_fixtures import FLAGS, PROMPTS, client_for, reference, reply, served_url  # noqa: F401 (a fixture)

from mistralrs_jax import cli

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def replicas_server(tmp_path_factory, smollm2_gguf_path):
    log = tmp_path_factory.mktemp("dp") / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "mistralrs_jax.cli", "--port", "0", *FLAGS,
                                    "--data-parallel-size", "2"], stdout=out, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT, env=env)
    try:
        url = served_url(log, [process])
        assert url is not None, log.read_text(errors="replace")[-3000:]
        yield url
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_two_replicas_share_concurrent_requests_and_answer_as_one_engine(replicas_server, reference):
    client = client_for(replicas_server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda prompt: reply(client, prompt), PROMPTS))
    assert replies == [reply(reference, prompt) for prompt in PROMPTS]

    status = httpx.get(f"{replicas_server}/v1/status", timeout=30).json()
    rows = status["metrics"]["replicas"]
    assert status["metrics"]["data_parallel_size"] == 2 and [row["replica"] for row in rows] == [0, 1]
    assert all(row["requests_total"] > 0 for row in rows), rows  # both replicas served some
    assert sum(row["requests_total"] for row in rows) == status["metrics"]["requests_total"] == len(PROMPTS)
    assert all(row["load"] == 0 and row["num_running"] == 0 for row in rows)  # all finished

    # Disjoint device groups, and each replica's weights and KV cache really on its own device.
    mesh = status["mesh"]
    groups = [set(replica["devices"]) for replica in mesh["replicas"]]
    assert len(groups) == 2 and all(len(g) == 1 for g in groups) and not groups[0] & groups[1]
    for replica in mesh["replicas"]:
        (device,) = replica["per_device"]
        assert device["weight_bytes"] > 0 and device["kv_cache_bytes"] > 0, replica

    metrics = httpx.get(f"{replicas_server}/metrics", timeout=30).text
    routed = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'mistralrs_replica_requests_routed\{[^}]*replica="(\d)"[^}]*\} (\S+)', metrics)}
    assert set(routed) == {"0", "1"} and all(v > 0 for v in routed.values()), metrics[-2000:]


def test_too_few_devices_for_the_replicas_is_one_line_error_before_loading(capsys):
    assert cli.main(["--data-parallel-size", "2", "plain", "-m", "./no/such/model"]) == 1
    err = capsys.readouterr().err
    assert "needs 2 devices, but only 1" in err and "xla_force_host_platform_device_count=2" in err, err
    assert err.count("\n") == 1 and "model path not found" not in err  # refused before the model is looked at
