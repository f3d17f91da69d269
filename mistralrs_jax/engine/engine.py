"""The engine loop: schedule -> (propose) -> run (runner) -> update -> stream, on a background thread.

One step (`Engine.step`): the scheduler decides ``{sequence: tokens}``; with a draft model
the `proposer` (speculative.DraftProposer) proposes tokens for the slots the scheduler
reserved; the runner runs the model once and samples (or verifies the drafts); the
scheduler appends the new tokens and applies the token-level stops; the engine turns
tokens into text, applies stop strings and grammars, and pushes deltas to each request's
handle.

`add_request` and `abort` are thread-safe: they queue a command that the loop thread
applies at the start of its next iteration, so the scheduler and KV cache bookkeeping are
only ever touched by the loop thread. `run_exclusive(fn)` runs work (re-quantization) on
the loop thread once every sequence in flight has finished, holding new requests back
meanwhile. Callers outside the engine (the LLM API, the server) use the methods here,
never the runner or the scheduler directly.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from ..config import EngineConfig
from ..errors import ImageError, InvalidRequestError, NotSupportedError
from ..guidance import ConstraintTracker
from ..loading.detokenizer import IncrementalDetokenizer
from ..loading.tokenizer import Tokenizer
from ..outputs import Logprob
from ..sampling_params import SamplingParams
from .metrics import EngineMetrics
from .multimodal import MultiModalInputs
from .request import CompletionDelta, RequestHandle
from .runner import ModelRunner
from .scheduler import LENGTH, STOP, Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


def release_free_heap() -> None:
    """Hand glibc's free heap pages back to the system (malloc_trim). Compiling a step shape and a
    burst of requests leave tens of MiB free but mapped in the allocator's arenas (~100 MiB after
    warm-up and a first request on SmolLM2); RSS then counts them until they are reused. A no-op
    where the C library has no malloc_trim."""
    global _malloc_trim
    if _malloc_trim is None:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None  # glibc's malloc_trim once looked up, False where there is none


@dataclass(frozen=True)
class EngineLimits:
    """What a request may ask of this engine (for validation and /v1/status)."""

    max_model_len: int  # prompt + output tokens of one sequence
    context_len: int  # the same, capped by what the KV pool holds
    max_seqs: int
    token_buckets: tuple[int, ...]  # padded step sizes compiled at start
    seq_buckets: tuple[int, ...]
    kv_blocks_total: int
    block_size: int


class _SeqState:
    """Engine-side text state of one sequence: detokenizer, stop-string hold-back."""

    def __init__(self, seq: Sequence, handle: RequestHandle, tokenizer: Tokenizer):
        self.seq = seq
        self.handle = handle
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=seq.params.skip_special_tokens,
                                            prompt_ids=seq.prompt_token_ids)
        self.text = ""  # all text decoded so far (stop strings are searched here)
        self.emitted = 0  # characters of `text` already sent
        self.last_token_time: float | None = None
        self.max_stop_len = max((len(s) for s in seq.params.stop), default=0)


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer: Tokenizer, vocab_size: int,
                 proposer=None, config: EngineConfig | None = None):
        """`proposer`: a speculative.DraftProposer (the runner then verifies its drafts every
        step), or None. `config`: the settings the engine was built from (reported in /v1/status).
        The EOS ids are the scheduler's (it applies them)."""
        self.runner = runner
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.tokenizer = tokenizer
        self.eos_token_ids = set(scheduler.eos_token_ids)
        self.vocab_size = vocab_size
        self.proposer = proposer
        self.config = config or EngineConfig()
        self.metrics = EngineMetrics()
        # Grammar-constrained sequences (response_format, grammar, forced tool calls): their matchers.
        self.constraints = ConstraintTracker(tokenizer, vocab_size, self.eos_token_ids)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._states: dict[int, _SeqState] = {}
        self._handles: dict[str, RequestHandle] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # run_exclusive: the pending (fn, future), and the commands held back until it ran.
        self._exclusive: tuple[Callable[[], Any], Future] | None = None
        self._deferred: list[tuple] = []
        self._compile_thread: threading.Thread | None = None  # warmup(background=True)
        self._update_gauges()
        self._update_compile_gauges()

    # -- public, any thread ----------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="mistralrs-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.wait_compiled(timeout=20)  # it stops after the shape it is compiling (a daemon thread past that)

    @property
    def limits(self) -> EngineLimits:
        kv = self.block_manager
        return EngineLimits(
            max_model_len=self.scheduler.max_model_len,
            context_len=min(self.scheduler.max_model_len, kv.num_token_slots),
            max_seqs=self.scheduler.max_num_seqs, token_buckets=tuple(self.runner.token_buckets),
            seq_buckets=tuple(self.runner.seq_buckets), kv_blocks_total=kv.num_total_blocks, block_size=kv.block_size)

    def stats(self) -> dict:
        """The metrics snapshot (counters, gauges, histograms) dashboards and /metrics read."""
        return self.metrics.snapshot()

    def mesh_report(self) -> dict:
        """{"tensor_parallel_size", "devices", "per_device": weight / KV bytes held, memory stats}."""
        return self.runner.mesh_report()

    def check_prompt_fits(self, num_prompt_tokens: int) -> None:
        """Raise PromptTooLongError if a prompt this long could never be served."""
        self.scheduler.check_prompt_fits(num_prompt_tokens)

    def warmup(self, progress: Callable | None = None, background: bool = False) -> None:
        """Compile every step shape (the runner's, and the draft model's) so no request waits on
        a compile; `progress(done, total, shape)` after each.

        `background`: compile only the smallest token bucket's shapes now and the rest on a
        compile thread, so serving can start at once. Meanwhile the scheduler keeps every step
        within the shapes compiled so far (`Scheduler.step_token_cap`: prefills are chunked
        into the small buckets, fewer sequences run at once), so still no step compiles.
        With a draft model everything is compiled now (its verification shapes are tied to
        the draft's)."""
        pairs = self.runner.shape_pairs()
        if background and self.proposer is None and len(pairs) > 1:
            smallest = pairs[0][0]
            first = [pair for pair in pairs if pair[0] == smallest]
            self.runner.warmup(None if progress is None else lambda i, n, shape: progress(i, len(pairs), shape),
                               pairs=first)
            self.scheduler.step_token_cap = smallest
            self._update_compile_gauges()
            self._compile_thread = threading.Thread(target=self._compile_in_background, args=(pairs[len(first):],),
                                                    name="mistralrs-compile", daemon=True)
            self._compile_thread.start()
            log.info("serving from %d of %d step shapes; compiling the rest in the background", len(first),
                     len(pairs))
            return
        self._warmup_everything(progress)

    def _compile_in_background(self, pairs: list[tuple[int, int]]) -> None:
        """The compile thread: each pair (ascending tokens) in turn, raising the scheduler's cap
        after each; at the end the cap is lifted and the compile count is the new baseline."""
        start = time.perf_counter()
        try:
            for pair in pairs:
                self.runner.warmup(pairs=[pair], stop=self._stop)
                if self._stop.is_set():
                    return
                self.scheduler.step_token_cap = pair[0]
                self._update_compile_gauges()
        except Exception:  # serving goes on within the shapes compiled so far
            log.exception("compiling step shapes in the background failed; serving steps of up to %s tokens",
                          self.scheduler.step_token_cap)
            return
        self.scheduler.step_token_cap = None
        self.metrics.compiles_at_start = self.metrics.snapshot()["compiles"]
        self._update_compile_gauges()
        release_free_heap()
        log.info("compiled the remaining %d step shapes in the background in %.1fs", len(pairs),
                 time.perf_counter() - start)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until the background compile (if any) has finished; whether it has."""
        thread = self._compile_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _update_compile_gauges(self) -> None:
        """How many step shapes are compiled, of how many (/v1/status, the TUI)."""
        self.metrics.set_gauges(step_shapes_compiled=len(self.runner.compiled_pairs),
                                step_shapes_total=len(self.runner.shape_pairs()),
                                compiling_in_background=self.scheduler.step_token_cap is not None)

    def _warmup_everything(self, progress: Callable | None) -> None:
        parts = [self.runner] + ([self.proposer] if self.proposer is not None else [])
        sizes = [len(self.runner.shape_pairs())] + ([self.proposer.num_warmup_shapes()] if self.proposer else [])
        total, done = sum(sizes), 0
        for part, size in zip(parts, sizes):
            offset = done
            part.warmup(None if progress is None else lambda i, n, shape: progress(offset + i, total, shape))
            done += size
        self.metrics.compiles_at_start = self.metrics.snapshot()["compiles"]
        self._update_compile_gauges()
        release_free_heap()

    def swap_weights(self, update: Callable[[], None], model, warmup: bool = True) -> None:
        """Run `update()` (which changes `model`'s weights in place, e.g. re-quantization) on the
        loop thread with nothing in flight, then serve `model`: new step functions, an empty
        prefix cache (cached KV came from the old weights) and, with `warmup`, every shape
        compiled again. The runner's old weights are dropped first so they can be freed tensor
        by tensor; whatever `update` raises is re-raised after the model is rebound."""
        def swap():
            self.wait_compiled()  # the compile thread traces the old step function
            self.runner.state_leaves = None
            try:
                update()
            finally:
                self.runner.rebind_model(model)
                self.block_manager.reset_prefix_cache()
                if warmup:
                    self.warmup()
                self.metrics.compiles_at_start = self.metrics.snapshot()["compiles"]

        self.run_exclusive(swap)

    def score(self, token_ids: list[int], multimodal=None):
        """Teacher-forced f32 logits [len, vocab] of the target model (runner.score)."""
        return self.runner.score(list(token_ids), multimodal=multimodal)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty: send at least one token", param="prompt")
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param="prompt")
        for name, ids in (("logit_bias", list((params.logit_bias or {}).keys())), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"{name} token ids must be in [0, {self.vocab_size}); got {bad[:5]}", param=name)
        self.scheduler.check_prompt_fits(len(prompt_token_ids))

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prompt: str | None = None,
                    multimodal: MultiModalInputs | None = None) -> RequestHandle:
        """`multimodal`: image features for the prompt's placeholder positions (vision models;
        LLM.chat_prompt / LlavaVision.prepare make them)."""
        params = params or SamplingParams()
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.validate(prompt_token_ids, params)
        if multimodal is not None and not getattr(self.runner, "input_embeds", False):
            raise ImageError("this engine's model takes no images: send text only")
        request_id = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        matchers = self._constraint_matchers(params)
        handle = RequestHandle(request_id, prompt, prompt_token_ids, params.n, engine=self)
        now = time.monotonic()
        seqs = [Sequence(request_id, prompt_token_ids, params, index=i, arrival_time=now, prompt=prompt,
                         multimodal=multimodal, cache_salt=multimodal.cache_salt if multimodal is not None else None)
                for i in range(params.n)]
        for seq, matcher in zip(seqs, matchers):
            self.constraints.register(seq.seq_id, matcher)
        self._commands.put(("add", handle, seqs))
        self._wakeup.set()
        if self._thread is None:
            self.start()
        return handle

    def _constraint_matchers(self, params: SamplingParams) -> list:
        """One grammar matcher per sequence of a constrained request (none for a free one)."""
        if params.dry_multiplier and self.proposer is not None:  # the verification step adds no DRY bias
            raise NotSupportedError("dry_multiplier: DRY sampling is not supported with speculative decoding; "
                                    "serve without a draft model or drop the DRY fields")
        if params.guided_decoding is None:
            return []
        if self.proposer is not None:  # speculative decoding does not verify under a mask
            raise NotSupportedError(
                f"{params.guided_decoding.param}: constrained output (a grammar, a JSON response_format or a "
                "forced tool call) is not supported with speculative decoding; serve without a draft model")
        return self.constraints.compile(params.guided_decoding, params.n)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (applied by the loop thread before its next step)."""
        self._commands.put(("reset_prefix_cache",))
        self._wakeup.set()

    def is_alive(self) -> bool:
        """The loop thread is running (for /health)."""
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the loop thread while no sequence is in flight; its result (or exception).

        Requests already queued run to completion first; requests added after this call
        wait until `fn` has returned (aborts still apply at once). For work that swaps
        what the runner holds (runtime re-quantization). Blocks the caller; never call it
        from the loop thread itself.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("run_exclusive would deadlock when called from the engine loop thread")
        future: Future = Future()
        self._commands.put(("exclusive", fn, future))
        self._wakeup.set()
        if self._thread is None:
            self.start()
        return future.result()

    # -- loop thread ---------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as exc:  # the loop itself died: nothing in flight may wait forever
            log.critical("the engine loop died; failing every request in flight", exc_info=True)
            # Requests get an Exception (callers and the server handle those), naming the cause.
            self._fail_all(exc if isinstance(exc, Exception) else
                           RuntimeError(f"the engine loop died: {type(exc).__name__}: {exc}"))
            raise

    def _run_loop(self) -> None:
        busy = False  # steps ran since the loop was last idle
        while not self._stop.is_set():
            if self._apply_commands():
                self._update_gauges()  # aborts free blocks now; show it before the next step ends
            if self._exclusive is not None and not self.scheduler.has_unfinished():
                self._run_exclusive_now()
                continue
            if not self.scheduler.has_unfinished():
                if busy:  # the last request just finished: give the step temporaries' pages back
                    release_free_heap()
                    busy = False
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()
                continue
            busy = True
            try:
                self.step()
            except Exception as exc:  # never let one bad step kill the server silently
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(exc)
        shutdown = RuntimeError("the engine was shut down")
        pending = [self._exclusive] if self._exclusive is not None else []
        pending += [(cmd[1], cmd[2]) for cmd in self._deferred if cmd[0] == "exclusive"]
        for _, future in pending:
            future.set_exception(shutdown)
        for cmd in self._deferred:
            if cmd[0] == "add":
                cmd[1]._fail(shutdown)
        self._exclusive, self._deferred = None, []
        self._fail_all(shutdown)

    def _run_exclusive_now(self) -> None:
        """Run the pending exclusive function (nothing is in flight), then the commands it held back."""
        fn, future = self._exclusive
        try:
            result = fn()
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        self._exclusive = None
        deferred, self._deferred = self._deferred, []
        for cmd in deferred:
            self._apply_command(cmd)
        self._update_gauges()

    def _apply_commands(self) -> bool:
        """Apply queued commands; True if there were any."""
        applied = False
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            self._apply_command(cmd)

    def _apply_command(self, cmd: tuple) -> None:
        if self._exclusive is not None and cmd[0] in ("add", "exclusive"):
            self._deferred.append(cmd)  # new work waits until the exclusive function has run
            return
        if cmd[0] == "exclusive":
            self._exclusive = (cmd[1], cmd[2])
        elif cmd[0] == "add":
            _, handle, seqs = cmd
            self._handles[handle.request_id] = handle
            self.metrics.count("requests_total")
            for seq in seqs:
                self._states[seq.seq_id] = _SeqState(seq, handle, self.tokenizer)
                self.scheduler.add(seq)
        elif cmd[0] == "reset_prefix_cache":
            self.block_manager.reset_prefix_cache()
        elif cmd[0] == "abort":
            self._drop_deferred(cmd[1])
            aborted = self.scheduler.abort(cmd[1])
            for seq in aborted:
                self._finish(seq, "abort", None, already_freed=True)
            if aborted:
                self.metrics.count("requests_aborted")

    def _drop_deferred(self, request_id: str) -> None:
        """An abort for a request still held back by run_exclusive: it never starts."""
        for cmd in [c for c in self._deferred if c[0] == "add" and c[1].request_id == request_id]:
            self._deferred.remove(cmd)
            self.metrics.count("requests_aborted")
            for seq in cmd[2]:
                self.constraints.release(seq.seq_id)
                cmd[1]._push(CompletionDelta(index=seq.index, text="", finish_reason="abort"))

    def step(self) -> None:
        """schedule -> (draft proposals) -> one model step -> append tokens -> stream them."""
        output = self.scheduler.schedule()
        for seq in output.finished_over_capacity:
            self._finish(seq, seq.finish_reason or LENGTH, None, already_freed=True)
        if output.is_empty:
            self._update_gauges()
            return
        prompt_tokens = sum(n for seq, n in output.scheduled if not seq.is_decoding)
        try:
            # Speculation: the draft model fills the lookahead slots the scheduler reserved.
            proposal = self.proposer.propose(output) if self.proposer is not None else None
            # One sampled token per row, or (speculation) the accepted drafts and one more.
            result = self.runner.execute(output.scheduled, self.constraints, proposal=proposal)
        except Exception as exc:  # the model or the sampler failed: only this step's requests fail
            log.exception("engine step failed; failing the %d sequences in it", len(output.scheduled))
            for request_id in dict.fromkeys(seq.request_id for seq, _ in output.scheduled):
                self._fail_request(request_id, exc)
            self._update_gauges()
            return
        new_tokens = {seq.seq_id: result.tokens(row) for row, (seq, _) in enumerate(output.scheduled)}
        cacheable = self.proposer.after_step(output, new_tokens) if self.proposer is not None else None
        rows = {seq.seq_id: row for row, (seq, _) in enumerate(output.scheduled)}
        generated = 0
        for seq, tokens in self.scheduler.update_after_step(output, new_tokens, cacheable):
            for position, token in enumerate(tokens):
                generated += 1
                if seq.seq_id not in self._states:
                    break  # its request failed earlier in this loop
                try:
                    last = position == len(tokens) - 1
                    if self._postprocess(seq, token, last, (result, rows[seq.seq_id], position)):
                        break  # a stop string or grammar ended it inside a speculative run
                except Exception as exc:  # e.g. the detokenizer: only this request fails
                    log.exception("processing the output of request %s failed; failing it", seq.request_id)
                    self._fail_request(seq.request_id, exc)
                    break
        if self.proposer is not None:
            self.proposer.retain({seq.seq_id for seq in self.scheduler.running})
        self.metrics.record_step(prompt_tokens, generated)
        self._update_gauges()

    def _postprocess(self, seq: Sequence, token: int, last: bool, logprob_source: tuple) -> bool:
        """Stream one appended token of `seq`: text, stop strings, the grammar, the finish.
        `last`: the last token the scheduler appended this step (when it finished the sequence,
        it did so at this token). Returns whether the sequence is finished now."""
        state = self._states[seq.seq_id]
        params = seq.params
        now = time.monotonic()
        if state.last_token_time is None:
            self.metrics.observe("ttft", now - seq.arrival_time)
        else:
            self.metrics.observe("itl", now - state.last_token_time)
        state.last_token_time = now
        # The scheduler's stops (EOS / stop token -> "stop"; max_tokens / max_model_len -> "length").
        finish, stop_reason = (seq.finish_reason, seq.stop_reason) if last and seq.is_finished else (None, None)
        grammar = self.constraints.advance(seq.seq_id, token)  # None, "done" or "error"
        if finish != STOP:  # a stop token's text is never shown
            state.text += state.detok.push(token)
            stop_str = self._find_stop_string(state, params)
            if stop_str is not None:
                finish, stop_reason = STOP, stop_str
            elif grammar is not None:  # the constraint is complete (or broken): nothing may follow
                finish, stop_reason = STOP, None
            if finish == STOP:
                self.scheduler.finish(seq, finish, stop_reason)  # also replaces a "length" at this token
        if finish is not None and not isinstance(stop_reason, str):
            state.text += state.detok.flush()  # bytes held back for a UTF-8 sequence still open
        logprobs = self._logprobs(seq, token, *logprob_source) if params.logprobs is not None else None
        if finish is None:
            # Hold back text that could still become a stop string.
            safe = len(state.text) - (state.max_stop_len - 1 if state.max_stop_len else 0)
        else:
            safe = len(state.text)
        safe = max(safe, state.emitted)
        delta = CompletionDelta(index=seq.index, text=state.text[state.emitted:safe], token_ids=[token],
                                logprobs=logprobs)
        state.emitted = safe
        if finish is not None:
            delta.finish_reason, delta.stop_reason = finish, stop_reason
            self._retire(seq)
        state.handle._push(delta)
        return finish is not None

    @staticmethod
    def _find_stop_string(state: _SeqState, params: SamplingParams) -> str | None:
        """The first stop string in the text (which is cut there, or after it when it is kept)."""
        if not params.stop:
            return None
        search_from = max(0, state.emitted - state.max_stop_len)
        hits = [(state.text.find(s, search_from), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None
        index, stop_str = min(hits)
        state.text = state.text[:index + len(stop_str) if params.include_stop_str_in_output else index]
        return stop_str

    def _logprobs(self, seq, token, result, row, position) -> list[dict[int, Logprob]]:
        entry = {}
        if result.logprobs is not None:
            entry[token] = Logprob(token, float(result.logprobs[row, position]),
                                   self.tokenizer.decode([token], skip_special_tokens=False))
            k = seq.params.logprobs
            if result.top_ids is not None and k:
                for tid, lp in zip(result.top_ids[row, position][:k], result.top_logprobs[row, position][:k]):
                    tid = int(tid)
                    if tid not in entry:
                        entry[tid] = Logprob(tid, float(lp), self.tokenizer.decode([tid], skip_special_tokens=False))
        return [entry]

    def _finish(self, seq: Sequence, reason: str, stop_reason, already_freed: bool = False) -> None:
        state = self._states.get(seq.seq_id)
        if state is None:
            return
        if not already_freed and not seq.is_finished:
            self.scheduler.finish(seq, reason, stop_reason)
        text = state.text[state.emitted:] if reason != "abort" else ""
        state.emitted = len(state.text)
        self._retire(seq)
        state.handle._push(CompletionDelta(index=seq.index, text=text, finish_reason=reason, stop_reason=stop_reason))

    def _retire(self, seq: Sequence) -> None:
        self.constraints.release(seq.seq_id)
        state = self._states.pop(seq.seq_id, None)
        if state is None:
            return
        handle = state.handle
        remaining = [s for s in self._states.values() if s.handle is handle]
        if not remaining:
            self._handles.pop(handle.request_id, None)
            self.metrics.count("requests_finished")
            handle.metrics["e2e_s"] = time.monotonic() - seq.arrival_time
            self.metrics.observe("e2e", handle.metrics["e2e_s"])

    def _fail_request(self, request_id: str, exc: BaseException) -> None:
        """End one request with an error: its sequences are aborted (blocks freed), its handle raises `exc`."""
        for seq in self.scheduler.abort(request_id):
            self._states.pop(seq.seq_id, None)
            self.constraints.release(seq.seq_id)
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            self.metrics.count("requests_failed")
            handle._fail(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self._handles):
            for seq in self.scheduler.abort(request_id):
                self._states.pop(seq.seq_id, None)
            handle = self._handles.pop(request_id)
            handle._fail(exc)
        self._states.clear()
        self.constraints.clear()

    def _update_gauges(self) -> None:
        bm = self.block_manager
        stats = bm.stats
        self.metrics.set_gauges(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_preempted=self.scheduler.num_preempted_total,
            kv_blocks_total=bm.num_total_blocks,
            kv_blocks_free=bm.num_free_blocks,
            kv_blocks_used=bm.num_used_blocks,
            block_size=self.runner.block_size,
            prefix_cache_hits=stats.prefix_cache_hits,
            prefix_cache_queries=stats.prefix_cache_queries,
            requests=self._request_rows(),
            **(self.proposer.gauges() if self.proposer is not None else {}),
        )

    def _request_rows(self) -> list[dict]:
        """One row per live sequence, for dashboards (/v1/status, the TUI)."""
        now = time.monotonic()
        rows = []
        for state in list(self._states.values()):
            seq = state.seq
            rate = None
            if seq.first_token_time is not None and seq.num_output_tokens > 1:
                rate = (seq.num_output_tokens - 1) / max(now - seq.first_token_time, 1e-6)
            rows.append({"request_id": seq.request_id, "index": seq.index, "status": seq.status.value,
                         "preemptions": seq.num_preemptions, "prompt_tokens": seq.num_prompt_tokens,
                         "cached_prompt_tokens": seq.num_cached_prefix_tokens,
                         "output_tokens": seq.num_output_tokens, "age_s": now - seq.arrival_time,
                         "tokens_per_s": rate})
        return rows
