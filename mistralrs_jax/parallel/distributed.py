"""Multi-host serving over `jax.distributed` (issue 15, part 2).

One command per host: every process loads the same model and compiles the same step shapes;
process 0 alone runs the HTTP server and the scheduler. Each time process 0's runner calls
one of its jitted functions (the model step, the sampler), `StepBroadcaster` first sends
that call's host inputs to the other processes with `multihost_utils.broadcast_one_to_all`,
and `worker_loop` on every other process makes the very same call on its own weights and
KV cache. So every process runs the same compiled programs in the same order, which is what
a mesh spanning all processes' devices needs (a program over the global mesh is a collective
every process must enter), and nothing is scheduled twice.

A message is one fixed-size frame: a header (kind, payload length, sequence number) and, for a
call, its payload: the call's arguments, pickled and zlib-compressed (a grammar-free bitmask is
all ones and shrinks to nothing). A payload too long for the frame sends its rest in a second
broadcast, padded to a power-of-two length so a handful of broadcast programs serve every step;
those sizes are compiled when the broadcaster starts.
The processes trust each other: they are one job, started by one operator, running each
other's compiled programs anyway.

Failure: a peer that dies breaks the next collective (gloo reports the closed connection at
once). Process 0 sends a heartbeat message whenever it has been idle for `HEARTBEAT_S`, so it
notices a dead peer within a second even with no traffic. Either side then logs which
processes are gone (asked of the coordination service, which knows within the heartbeat
timeout), fails the requests in flight with a `DistributedError` and exits with
`EXIT_PEER_LOST`, skipping JAX's shutdown barrier (which would wait for the dead peer).
"""
from __future__ import annotations

import atexit
import logging
import os
import pickle
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import MistralRsError, NotSupportedError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60  # joining the cluster, and a silent peer's heartbeat (coordination service)
HEARTBEAT_S = 1.0  # process 0 sends a heartbeat message after this long without traffic
EXIT_PEER_LOST = 3
# Message kinds (the header's first word).
STOP, HEARTBEAT, STEP, SAMPLE = 0, 1, 2, 3
HEADER_BYTES = 32  # four int64 words: kind, payload bytes, sequence number, reserved
FRAME_BYTES = 8192  # every message's first broadcast: the header and the payload's first bytes
MIN_PAYLOAD_BYTES = 1 << 10
_timeout_s = DEFAULT_TIMEOUT_S  # as initialize() was given it
READY_TIMEOUT_S = 900  # for the slowest process to load and compile, once every process runs
PREWARMED_PAYLOAD_BYTES = 1 << 20  # payload sizes up to this are compiled at start


class DistributedError(MistralRsError):
    """The processes of a multi-host run cannot go on together (a peer died or diverged)."""

    http_status = 503
    error_type = "server_error"


@dataclass(frozen=True)
class DistributedSettings:
    """Where the cluster's coordinator is and who this process is (`--coordinator-address
    HOST:PORT --num-processes P --process-id I`, or the environment, see `from_flags`)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int = DEFAULT_TIMEOUT_S

    @classmethod
    def from_flags(cls, coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, timeout_s: int | None = None) -> "DistributedSettings | None":
        """Settings from the flags, each missing one from the environment: JAX_COORDINATOR_ADDRESS
        (read by jax.distributed itself too), JAX_NUM_PROCESSES and JAX_PROCESS_ID; what is still
        missing, JAX's cluster detection (SLURM, Open MPI, ...) fills in. None: a single process."""
        coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
        if coordinator_address is None and num_processes is None and process_id is None:
            return None
        if num_processes is not None and num_processes < 1:
            raise NotSupportedError(f"--num-processes must be at least 1, got {num_processes}")
        if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
            raise NotSupportedError(f"--process-id must be in [0, {num_processes}) (one id per process of "
                                    f"--num-processes), got {process_id}")
        if coordinator_address is not None and ":" not in coordinator_address:
            raise NotSupportedError(f"--coordinator-address must be HOST:PORT (process 0's host and a free port "
                                    f"every process can reach), got {coordinator_address!r}")
        return cls(coordinator_address, num_processes, process_id, timeout_s or DEFAULT_TIMEOUT_S)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise NotSupportedError(f"the environment variable {name} must be an integer, got {value!r}") from None


def initialize(settings: DistributedSettings) -> None:
    """Join the cluster (`jax.distributed.initialize`); call before anything touches a device.

    CPU collectives go through gloo (XLA:CPU has none by default). Joining waits at most
    `timeout_s` for every process; a peer that stops sending heartbeats for `timeout_s` is
    declared dead by the coordination service."""
    import jax

    global _timeout_s
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):  # gloo is 0.10's default already
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Without it the coordination service aborts every process (SIGABRT, a C++ stack trace) once a
    # peer misses its heartbeats; with it, a lost peer is ours to report and exit on (`describe_lost_peers`).
    jax.config.update("jax_enable_recoverability", True)
    _timeout_s = settings.timeout_s
    start = time.perf_counter()
    log.info("joining the multi-host cluster at %s as process %s of %s (waiting up to %d s for the others)",
             settings.coordinator_address, settings.process_id, settings.num_processes, settings.timeout_s)
    failed = (f"could not join the multi-host cluster at {settings.coordinator_address} as process "
              f"{settings.process_id} of {settings.num_processes} within {settings.timeout_s} s")
    hint = "start one process per id, all with the same --coordinator-address and --num-processes"
    # JAX's client aborts the process (a C++ stack trace) a few seconds after its own join timeout:
    # say what went wrong first, and leave.
    watchdog = threading.Timer(settings.timeout_s + 1, exit_peer_lost,
                               args=(f"{failed}: process 0's coordinator is unreachable or a process is missing "
                                     f"({hint})", 0.0))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                                   initialization_timeout=settings.timeout_s,
                                   heartbeat_timeout_seconds=settings.timeout_s,
                                   shutdown_timeout_seconds=settings.timeout_s)
    except Exception as exc:
        raise DistributedError(f"{failed}: {exc} ({hint})") from exc
    finally:
        watchdog.cancel()
    # Registered after JAX's own exit hook (which disconnects from the coordinator), so it runs first.
    atexit.register(_leave_in_order, jax.process_index(), jax.process_count())
    log.info("joined the cluster in %.1fs: process %d of %d, %d local / %d global devices", time.perf_counter() - start,
             jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _left_key(process_id: int) -> str:
    return f"mistralrs-jax/left/{process_id}"


def _leave_in_order(process_id: int, count: int) -> None:
    """At exit: process 0 hosts the coordination service, so it waits (up to the timeout) until
    every other process has said it is leaving, and then a moment for their disconnects to land;
    JAX's exit hook would abort a process whose disconnect finds the coordinator gone."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        return
    try:
        if process_id != 0:
            client.key_value_set(_left_key(process_id), "1")
            return
        deadline = time.monotonic() + _timeout_s
        for other in range(1, count):
            client.blocking_key_value_get(_left_key(other), max(1, int((deadline - time.monotonic()) * 1000)))
        time.sleep(0.5)
    except Exception as exc:  # a peer already gone, or the coordinator: nothing left to wait for
        log.debug("leaving the cluster: %s", exc)


def is_multi_process() -> bool:
    import jax

    return jax.process_count() > 1


def check_mesh_spans_processes(tensor_parallel_size: int) -> None:
    """Several processes: -tp must take every process's devices (one mesh over all of them), or be 1
    (each process then holds the whole model on its first device and mirrors process 0)."""
    import jax

    if jax.process_count() == 1 or tensor_parallel_size in (1, jax.device_count()):
        return
    raise NotSupportedError(
        f"tensor_parallel_size (-tp) {tensor_parallel_size} with {jax.process_count()} processes: the mesh must span "
        f"every process's devices, -tp {jax.device_count()} here ({jax.local_device_count()} per process), or be 1")


# -- messages ------------------------------------------------------------------------------


def _padded_payload_size(num_bytes: int) -> int:
    """Bytes of the broadcast buffer for a payload: powers of two from MIN_PAYLOAD_BYTES, so a
    handful of collective sizes is compiled (not one per message length)."""
    return max(MIN_PAYLOAD_BYTES, 1 << max(0, num_bytes - 1).bit_length())


class Channel:
    """Process 0 -> every process, over `broadcast_one_to_all`: `send` on process 0, `receive`
    everywhere else, in the same order. Thread-safe on the sending side (`lock`)."""

    def __init__(self):
        import jax

        self.is_source = jax.process_index() == 0
        self.lock = threading.RLock()
        self.sequence = 0
        self.last_send = time.monotonic()

    def _broadcast(self, array: np.ndarray) -> np.ndarray:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(array, is_source=self.is_source))

    def prewarm(self) -> None:
        """Wait until every process is ready (loaded and warmed up: they may take different times,
        and gloo gives its first collective only 30 s), then compile the broadcast of the header
        and of every payload size up to PREWARMED_PAYLOAD_BYTES (it exchanges zeros)."""
        import jax
        from jax._src import distributed

        log.info("process %d: waiting (up to %d s) for every process to finish loading", jax.process_index(),
                 READY_TIMEOUT_S)
        try:
            distributed.global_state.client.wait_at_barrier("mistralrs-jax/ready", READY_TIMEOUT_S * 1000)
        except Exception as exc:
            raise DistributedError(f"multi-host: the other processes did not finish loading within "
                                   f"{READY_TIMEOUT_S} s: {str(exc).splitlines()[0][:300]}") from exc
        self._broadcast(np.zeros(FRAME_BYTES, np.uint8))
        size = MIN_PAYLOAD_BYTES
        while size <= PREWARMED_PAYLOAD_BYTES:
            self._broadcast(np.zeros(size, np.uint8))
            size *= 2

    def send(self, kind: int, payload: Any = None) -> None:
        """One collective for a message that fits a frame (a step's inputs do), two otherwise."""
        with self.lock:
            data = b"" if payload is None else zlib.compress(pickle.dumps(payload, protocol=5), 1)
            self.sequence += 1
            frame = np.zeros(FRAME_BYTES, np.uint8)
            frame[:HEADER_BYTES] = np.array([kind, len(data), self.sequence, 0], np.int64).view(np.uint8)
            inline = data[:FRAME_BYTES - HEADER_BYTES]
            frame[HEADER_BYTES:HEADER_BYTES + len(inline)] = np.frombuffer(inline, np.uint8)
            self._broadcast(frame)
            rest = data[len(inline):]
            if rest:
                buffer = np.zeros(_padded_payload_size(len(rest)), np.uint8)
                buffer[:len(rest)] = np.frombuffer(rest, np.uint8)
                self._broadcast(buffer)
            self.last_send = time.monotonic()

    def receive(self) -> tuple[int, Any]:
        frame = self._broadcast(np.zeros(FRAME_BYTES, np.uint8))
        kind, length, sequence, _ = (int(v) for v in frame[:HEADER_BYTES].view(np.int64))
        self.sequence += 1
        if sequence != self.sequence:
            raise DistributedError(f"message {sequence} arrived where {self.sequence} was due: the processes "
                                   "are out of step")
        if not length:
            return kind, None
        data = frame[HEADER_BYTES:HEADER_BYTES + length].tobytes()
        if length > len(data):
            missing = length - len(data)
            data += self._broadcast(np.zeros(_padded_payload_size(missing), np.uint8))[:missing].tobytes()
        return kind, pickle.loads(zlib.decompress(data))


# -- what crosses: a call's arguments as host arrays, and how to place them again -------------


def _to_host(tree: Any) -> tuple[Any, list]:
    """(host copy of `tree`'s arrays, the PartitionSpec of each leaf in flattening order: None
    for a single-device array)."""
    import jax
    from jax.sharding import NamedSharding

    specs = [leaf.sharding.spec if isinstance(getattr(leaf, "sharding", None), NamedSharding) else None
             for leaf in jax.tree.leaves(tree)]
    return jax.tree.map(np.asarray, jax.device_get(tree)), specs


def _place(host: Any, specs: list, mesh: Any) -> Any:
    """Put `host` back on the devices as process 0 had it: on `mesh` with each leaf's spec, or on
    the default device where it was a single-device array (or there is no mesh)."""
    import jax
    from jax.sharding import NamedSharding

    leaves, treedef = jax.tree.flatten(host)
    placed = [jax.device_put(leaf) if spec is None or mesh is None else jax.device_put(leaf, NamedSharding(mesh, spec))
              for leaf, spec in zip(leaves, specs)]
    return jax.tree.unflatten(treedef, placed)


class _Broadcasting:
    """A runner's jitted function that first sends its call to the other processes. Attribute
    access (`.lower`, ...) reaches the jitted function itself, so compiling ahead of time is untouched."""

    def __init__(self, fn: Callable, kind: int, broadcaster: "StepBroadcaster", num_local: int):
        self._fn, self._kind, self._broadcaster, self._num_local = fn, kind, broadcaster, num_local

    def __call__(self, *args, **kwargs):
        # The first `num_local` arguments are per-process state (weights, KV cache; or the logits
        # the previous step left on every process); the rest are the call's inputs.
        return self._broadcaster.call(self._kind, self._fn, args[:self._num_local], args[self._num_local:], kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


class StepBroadcaster:
    """Installed on process 0's runner after warm-up: its step and sampler calls are sent to the
    other processes first (see the module docstring); a heartbeat thread keeps idle peers in touch."""

    def __init__(self, runner: Any, channel: Channel | None = None, on_lost: Callable[[str], None] | None = None):
        if getattr(runner, "num_lookahead_tokens", 0):
            raise NotSupportedError("speculative decoding (a draft model) is not supported across several "
                                    "processes (--num-processes) yet; serve the target model alone")
        self.runner = runner
        self.channel = channel or Channel()
        self.on_lost = on_lost or exit_peer_lost
        self.lost: str | None = None
        self._stop = threading.Event()
        runner._step_fn = _Broadcasting(runner._step_fn, STEP, self, 2)
        runner._sample_fn = _Broadcasting(runner._sample_fn, SAMPLE, self, 1)
        self._heartbeat = threading.Thread(target=self._beat, name="mistralrs-heartbeat", daemon=True)
        self._heartbeat.start()

    def call(self, kind: int, fn: Callable, local: tuple, inputs: tuple, kwargs: dict):
        if self.lost is not None:
            raise DistributedError(self.lost)
        with self.channel.lock:
            try:
                self.channel.send(kind, (*_to_host(inputs), kwargs))
                return fn(*local, *inputs, **kwargs)
            except Exception as exc:
                raise self._peer_lost(exc) from exc

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S / 4):
            if time.monotonic() - self.channel.last_send < HEARTBEAT_S or self.lost is not None:
                continue
            with self.channel.lock:
                if self._stop.is_set():
                    return
                try:
                    self.channel.send(HEARTBEAT)
                except Exception as exc:
                    self._peer_lost(exc)
                    return

    def _peer_lost(self, exc: BaseException) -> DistributedError:
        if self.lost is None:
            self.lost = describe_lost_peers(exc)
            log.critical("%s", self.lost)
            self.on_lost(self.lost)
        return DistributedError(self.lost)

    def stop_workers(self) -> None:
        """Tell every other process to leave its loop (process 0 is shutting down)."""
        self._stop.set()
        if self.lost is not None:
            return
        with self.channel.lock:
            try:
                self.channel.send(STOP)
            except Exception as exc:
                self._peer_lost(exc)
        self._heartbeat.join(timeout=5)


def worker_loop(runner: Any, channel: Channel | None = None) -> None:
    """On every process but 0: make each call process 0 announces, on this process's runner,
    until it says stop. Raises DistributedError when process 0 (or another peer) is gone."""
    import jax

    channel = channel or Channel()
    step_fn, sample_fn = runner._step_fn, runner._sample_fn
    mesh = getattr(runner, "mesh", None)
    logits = None
    steps = 0
    log.info("process %d: following process 0's steps", jax.process_index())
    while True:
        try:
            kind, payload = channel.receive()
            if kind == STOP:
                log.info("process %d: process 0 is shutting down, after %d steps", jax.process_index(), steps)
                return
            if kind == HEARTBEAT:
                continue
            host, specs, kwargs = payload
            inputs = _place(host, specs, mesh)
            if kind == STEP:
                logits, runner.kv_caches = step_fn(runner.state_leaves, runner.kv_caches, *inputs, **kwargs)
                steps += 1
            elif kind == SAMPLE:
                jax.block_until_ready(sample_fn(logits, *inputs, **kwargs))
            else:
                raise DistributedError(f"unknown message kind {kind} from process 0: the processes run different "
                                       "versions of mistralrs-jax")
        except DistributedError:
            raise
        except Exception as exc:
            raise DistributedError(describe_lost_peers(exc)) from exc


def describe_lost_peers(exc: BaseException) -> str:
    """A one-line account of a failed collective: which processes the coordination service no
    longer sees (it knows within its heartbeat timeout), and the error itself."""
    import jax

    me, count = jax.process_index(), jax.process_count()
    found: list = []

    def ask() -> None:  # answers once the service has declared the peer dead (its heartbeat timeout)
        try:
            from jax._src import distributed

            live = distributed.global_state.client.get_live_nodes(list(range(count)))
            found.append(sorted(set(range(count)) - set(live)))
        except Exception as query_error:  # the coordinator itself (on process 0) may be the one gone
            log.debug("asking the coordination service for live processes failed: %s", query_error)
            found.append([0] if me != 0 else None)

    log.error("multi-host: a collective with the other processes failed (%s); asking the coordinator which "
              "processes are gone (up to %d s)", str(exc).strip().splitlines()[0][:300], _timeout_s)
    asker = threading.Thread(target=ask, name="mistralrs-live-nodes", daemon=True)
    asker.start()
    asker.join(_timeout_s + 5)
    gone = found[0] if found else None
    what = (f"lost contact with process {', '.join(map(str, gone))} of {count}" if gone else
            f"a step across the {count} processes failed (the coordinator named no process as gone)")
    return (f"multi-host: {what}: {str(exc).strip().splitlines()[0][:300]}; process {me} cannot go on alone "
            "and exits (restart every process to serve again)")


def exit_peer_lost(message: str, delay_s: float = 1.0) -> None:
    """Exit this process with EXIT_PEER_LOST after `delay_s` (time for the requests in flight to get
    their error), skipping the atexit shutdown barrier that would wait for the dead peer."""
    def leave():
        time.sleep(delay_s)
        print(f"mistralrs-jax: error: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_PEER_LOST)

    threading.Thread(target=leave, name="mistralrs-exit", daemon=True).start()


class MultiHost:
    """What `LLM` holds in a multi-process run (`attach`): on process 0 the broadcaster, on the
    others what `follow` needs. The processes call `attach` at the same point, after warm-up."""

    def __init__(self, runner: Any):
        import jax

        self.process_id, self.num_processes = jax.process_index(), jax.process_count()
        self.channel = Channel()
        self.channel.prewarm()
        self.runner = runner
        self.broadcaster = StepBroadcaster(runner, self.channel) if self.process_id == 0 else None

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    def as_dict(self) -> dict:
        return {"process_id": self.process_id, "num_processes": self.num_processes}

    def follow(self) -> None:
        """A process > 0: run process 0's steps until it stops, then exit the process (0); a lost
        peer exits it at once (EXIT_PEER_LOST)."""
        try:
            worker_loop(self.runner, self.channel)
        except DistributedError as exc:
            log.critical("%s", exc)
            exit_peer_lost(str(exc), delay_s=0.0)
            threading.Event().wait()  # the exit thread ends the process
        # Leave without JAX's shutdown handshake: process 0 hosts the coordination service and may
        # be gone before it would answer (recoverable tasks do not hold its shutdown back).
        _leave_in_order(self.process_id, self.num_processes)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)

    def close(self) -> None:
        """Process 0 shutting down: release the others from `follow`."""
        if self.broadcaster is not None:
            self.broadcaster.stop_workers()


def attach(runner: Any) -> MultiHost | None:
    """A `MultiHost` for `runner` when this is one of several processes, else None."""
    return MultiHost(runner) if is_multi_process() else None
