"""Serving benchmark: load an OpenAI-compatible server and measure throughput and latency.

    python -m benchmarks.serving --url http://127.0.0.1:1234 --concurrency 1,4,16 --num-requests 20
    python -m benchmarks.serving --url http://127.0.0.1:8080 --request-rate 0.5,1,inf --max-tokens 64
    mistralrs-jax bench serving --url ...           # the same, from the main command line

Works against any server that streams OpenAI chat or text completions (ours, llama.cpp's
`llama-server`, vLLM). Two ways to offer load, one sweep level per value:

- ``--concurrency N``: a closed loop; N clients each send their next request as soon as
  their previous one ends.
- ``--request-rate R``: an open loop; requests arrive as a Poisson process of R requests
  per second (exponential gaps, seeded), ``inf`` sends them all at once. ``--max-concurrency``
  caps how many are in flight.

What is measured, per request, on the client's monotonic clock:

- TTFT: from sending the request to the first streamed chunk that carries text.
- latency (E2E): from sending to the end of the stream.
- TPOT (time per output token): (latency − TTFT) / (output tokens − 1); requests with one
  output token have none.
- ITL (inter-token latency): every gap between consecutive text-bearing chunks. A server
  that packs several tokens into one chunk shows fewer, longer gaps here, while TPOT
  still divides by tokens.
- Output tokens: the server's own ``usage.completion_tokens`` (asked for with
  ``stream_options.include_usage``); servers that do not send it are counted one token
  per text chunk, and the result says which (``token_count_source``).

Per level: request throughput (completed requests / duration) and output throughput
(output tokens / duration), where duration runs from the first request sent to the last
one finished; TTFT, TPOT, ITL and E2E as mean / median / p99.

Prompts are made of seeded random common words, each with a distinct opening, so a
prefix cache cannot skip their prefill. ``ignore_eos`` is sent (a vLLM / llama.cpp /
mistralrs-jax extension) so every request generates exactly ``--max-tokens`` tokens.

Writes ``serving.json`` (settings, machine, server, summaries, every request),
``serving.md`` (the table) and ``serving.png`` (throughput and latency percentiles per
level) into a fresh folder under ``--out``; each file names the machine.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

from mistralrs_jax.errors import MistralRsError

from .machine import describe_machine, one_line

log = logging.getLogger(__name__)

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# Short, common English words: prompts read like text to any tokenizer (about 1.3 tokens a word).
WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue "
         "side kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education "
         "river garden market winter summer light music road paper table window stone bread letter field").split()


class BenchmarkError(MistralRsError):
    """The server cannot be benchmarked as asked (unreachable, no model, every request failed)."""


# --------------------------------------------------------------------------- settings and records


@dataclasses.dataclass
class ServingConfig:
    url: str
    api_key: str | None = None
    model: str | None = None  # None: the first model /v1/models lists
    endpoint: str = "chat"
    concurrency: list[int] = dataclasses.field(default_factory=list)
    request_rates: list[float] = dataclasses.field(default_factory=list)
    max_concurrency: int | None = None
    num_requests: int = 20
    prompt_words: int = 48
    max_tokens: int = 32
    temperature: float = 0.0
    ignore_eos: bool = True
    warmup_requests: int = 1
    seed: int = 0
    timeout_s: float = 600.0
    out: str = "results"
    plot: bool = True

    @property
    def base_url(self) -> str:
        base = self.url.rstrip("/")
        return base[: -len("/v1")] if base.endswith("/v1") else base

    def levels(self) -> list[tuple[str, float]]:
        """The sweep: ("concurrency", N) or ("rate", R) per level, in the order given."""
        return [("concurrency", float(n)) for n in self.concurrency] + [("rate", r) for r in self.request_rates]


@dataclasses.dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds; `start` is relative to the level's start."""

    start: float = 0.0
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text_chunks: int = 0
    itl: list[float] = dataclasses.field(default_factory=list)
    usage_reported: bool = False

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


# --------------------------------------------------------------------------- prompts


def make_prompts(count: int, words: int, seed: int) -> list[str]:
    """`count` distinct prompts of about `words` words; each opens differently (no shared prefix)."""
    rng = random.Random(seed)
    prompts = []
    for index in range(count):
        body = " ".join(rng.choice(WORDS) for _ in range(max(words - 4, 1)))
        prompts.append(f"Request {index} {rng.randrange(10**6)}: continue this list. {body}")
    return prompts


def request_body(config: ServingConfig, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": config.max_tokens, "temperature": config.temperature,
                            "stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


# --------------------------------------------------------------------------- one request


def _chunk_text(chunk: dict[str, Any], endpoint: str) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if endpoint == "chat":
            text += (choice.get("delta") or {}).get("content") or ""
        else:
            text += choice.get("text") or ""
    return text


async def send_request(client: Any, config: ServingConfig, model: str, prompt: str,
                       level_start: float) -> RequestRecord:
    """Stream one completion; never raises for a failed request (it is recorded as failed)."""
    record = RequestRecord()
    sent = time.monotonic()
    record.start = sent - level_start
    last_text_at: float | None = None
    try:
        body = request_body(config, model, prompt)
        async with client.stream("POST", ENDPOINTS[config.endpoint], json=body) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {body[:300]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    record.error = f"error in stream: {chunk['error']}"
                    return record
                now = time.monotonic()
                if _chunk_text(chunk, config.endpoint):
                    record.text_chunks += 1
                    if last_text_at is None:
                        record.ttft = now - sent
                    else:
                        record.itl.append(now - last_text_at)
                    last_text_at = now
                usage = chunk.get("usage")
                if usage:
                    record.usage_reported = True
                    record.output_tokens = int(usage.get("completion_tokens") or 0)
                    record.prompt_tokens = usage.get("prompt_tokens")
        record.latency = time.monotonic() - sent
        if not record.usage_reported:
            record.output_tokens = record.text_chunks
        record.ok = record.ttft is not None
        if not record.ok:
            record.error = "the stream ended without any text"
    except Exception as exc:  # a benchmark reports failures, it does not stop at the first
        record.error = f"{type(exc).__name__}: {exc}"
    return record


# --------------------------------------------------------------------------- one level


async def _closed_loop(client: Any, config: ServingConfig, model: str, prompts: list[str], concurrency: int,
                       level_start: float) -> list[RequestRecord]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    records: list[RequestRecord] = []

    async def worker() -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            records.append(await send_request(client, config, model, prompt, level_start))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process of `rate` per second; all 0 for rate inf."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def _open_loop(client: Any, config: ServingConfig, model: str, prompts: list[str], rate: float,
                     level_start: float) -> list[RequestRecord]:
    limit = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

    async def one(offset: float, prompt: str) -> RequestRecord:
        await asyncio.sleep(max(0.0, level_start + offset - time.monotonic()))
        if limit is None:
            return await send_request(client, config, model, prompt, level_start)
        async with limit:
            return await send_request(client, config, model, prompt, level_start)

    offsets = poisson_arrivals(len(prompts), rate, config.seed)
    return list(await asyncio.gather(*(one(offset, prompt) for offset, prompt in zip(offsets, prompts))))


def distribution(values: list[float]) -> dict[str, float | None]:
    """mean / median / p99 (linear interpolation between order statistics, as numpy's default)."""
    if not values:
        return {"mean": None, "median": None, "p99": None}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = math.floor(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"mean": sum(ordered) / len(ordered), "median": quantile(0.5), "p99": quantile(0.99)}


def summarize(records: list[RequestRecord], duration_s: float) -> dict[str, Any]:
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    reported = sum(r.usage_reported for r in done)
    return {
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s,
        "total_output_tokens": output_tokens,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_throughput": output_tokens / duration_s if duration_s > 0 else 0.0,
        "token_count_source": "usage" if done and reported == len(done) else
                              "text chunks" if reported == 0 else "mixed (usage where sent, else text chunks)",
        "ttft_s": distribution([r.ttft for r in done if r.ttft is not None]),
        "tpot_s": distribution([r.tpot for r in done if r.tpot is not None]),
        "itl_s": distribution([gap for r in done for gap in r.itl]),
        "e2e_s": distribution([r.latency for r in done if r.latency is not None]),
    }


# --------------------------------------------------------------------------- the sweep


async def _server_info(client: Any, config: ServingConfig) -> dict[str, Any]:
    """The model to use and what the server says about itself (its /v1/status, where it has one)."""
    try:
        response = await client.get("/v1/models")
    except Exception as exc:
        raise BenchmarkError(f"cannot reach {config.base_url}: {exc}; is the server running? "
                             "(start one with `mistralrs-server --port PORT`)") from None
    if response.status_code == 401:
        raise BenchmarkError(f"{config.base_url} wants an API key: pass --api-key")
    if response.status_code != 200:
        raise BenchmarkError(f"GET {config.base_url}/v1/models answered HTTP {response.status_code}; "
                             "is --url an OpenAI-compatible server?")
    models = [m.get("id") for m in response.json().get("data", [])]
    model = config.model or (models[0] if models else None)
    if model is None:
        raise BenchmarkError(f"{config.base_url}/v1/models lists no model; pass --model")
    info: dict[str, Any] = {"url": config.base_url, "model": model, "models": models}
    try:
        status = await client.get("/v1/status")
        if status.status_code == 200:
            body = status.json()
            info["status"] = {key: body.get(key) for key in ("model", "engine", "runtime", "memory") if key in body}
    except Exception:  # only mistralrs-jax has /v1/status; others are described by their URL alone
        pass
    return info


async def run_sweep(config: ServingConfig) -> dict[str, Any]:
    """Run every level of the sweep against the server; the whole result (not yet written)."""
    import httpx

    if not config.levels():
        raise BenchmarkError("nothing to run: give --concurrency and/or --request-rate")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    most_in_flight = max([int(v) for k, v in config.levels() if k == "concurrency"] + [config.num_requests])
    limits = httpx.Limits(max_connections=most_in_flight + 4, max_keepalive_connections=most_in_flight + 4)
    async with httpx.AsyncClient(base_url=config.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(config.timeout_s, connect=30.0)) as client:
        server = await _server_info(client, config)
        model = server["model"]
        warmup = make_prompts(config.warmup_requests, config.prompt_words, config.seed + 10_000)
        for prompt in warmup:  # first requests may pay for lazy start-up work: keep them out of the numbers
            record = await send_request(client, config, model, prompt, time.monotonic())
            if not record.ok:
                raise BenchmarkError(f"the warm-up request failed: {record.error}")
        levels = []
        for number, (kind, value) in enumerate(config.levels()):
            prompts = make_prompts(config.num_requests, config.prompt_words, config.seed + 1000 * (number + 1))
            log.info("level %s=%s: %d requests", kind, value, len(prompts))
            start = time.monotonic()
            if kind == "concurrency":
                records = await _closed_loop(client, config, model, prompts, int(value), start)
            else:
                records = await _open_loop(client, config, model, prompts, value, start)
            duration = time.monotonic() - start
            summary = summarize(records, duration)
            if summary["completed"] == 0:
                raise BenchmarkError(f"every request of level {kind}={value} failed: {summary['errors']}")
            levels.append({"kind": kind, "value": value if kind == "rate" else int(value), "summary": summary,
                           "requests": [dataclasses.asdict(r) | {"tpot": r.tpot} for r in records]})
    settings = dataclasses.asdict(config)
    settings.pop("api_key")  # a secret has no place in a results file
    return {
        "benchmark": "serving",
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(server),
        "server": server,
        "settings": settings,
        "definitions": {
            "ttft": "send -> first text chunk",
            "tpot": "(latency - ttft) / (output_tokens - 1), requests with >= 2 output tokens",
            "itl": "gaps between consecutive text chunks, all requests pooled",
            "e2e": "send -> end of stream",
            "duration": "first request sent -> last request finished",
            "percentiles": "linear interpolation between order statistics",
        },
        "levels": levels,
    }


def _machine(server: dict[str, Any]) -> dict[str, Any]:
    """The client machine; plus the server's JAX runtime when it reports one (a remote server may differ)."""
    machine = describe_machine(with_jax_backend=False)
    runtime = (server.get("status") or {}).get("runtime") or {}
    if runtime.get("backend"):
        machine["jax_backend"] = f"{runtime['backend']} (server)"
    if runtime.get("jax"):
        machine["server_jax"] = runtime["jax"]
    machine["note"] = "the client's machine; the server's JAX backend where its /v1/status reports it"
    return machine


# --------------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.1f}"


def level_label(level: dict[str, Any]) -> str:
    if level["kind"] == "concurrency":
        return f"c={level['value']}"
    return "rate=inf" if math.isinf(level["value"]) else f"rate={level['value']:g}/s"


def markdown_table(result: dict[str, Any]) -> str:
    settings = result["settings"]
    lines = [
        f"# Serving benchmark: {result['server']['model']} at {result['server']['url']}",
        "",
        f"- time: {result['time']}",
        f"- machine: {one_line(result['machine'])}",
        f"- workload: {settings['num_requests']} requests per level, ~{settings['prompt_words']}-word prompts, "
        f"max_tokens {settings['max_tokens']}, ignore_eos {settings['ignore_eos']}, temperature "
        f"{settings['temperature']}, endpoint {settings['endpoint']}",
        "- TPOT = (latency − TTFT) / (output tokens − 1); ITL = gaps between streamed text chunks; "
        "times in ms as mean / median / p99",
        "",
        "| level | ok/failed | req/s | output tok/s | TTFT ms | TPOT ms | ITL ms | E2E ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for level in result["levels"]:
        s = level["summary"]
        cells = [level_label(level), f"{s['completed']}/{s['failed']}", f"{s['request_throughput']:.2f}",
                 f"{s['output_throughput']:.1f}"]
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            d = s[key]
            cells.append(f"{_ms(d['mean'])} / {_ms(d['median'])} / {_ms(d['p99'])}")
        lines.append("| " + " | ".join(cells) + " |")
    sources = {level["summary"]["token_count_source"] for level in result["levels"]}
    lines += ["", f"Output tokens counted from: {', '.join(sorted(sources))}."]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out: str, plot: bool = True) -> Path:
    """Write serving.json, serving.md and (with matplotlib) serving.png into a new folder; return it."""
    folder = Path(out) / f"serving-{dt.datetime.now():%Y%m%d-%H%M%S-%f}"
    folder.mkdir(parents=True, exist_ok=False)
    (folder / "serving.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "serving.md").write_text(markdown_table(result), encoding="utf-8")
    if plot:
        from .plots import plot_serving

        plot_serving(result, folder / "serving.png")
    return folder


# --------------------------------------------------------------------------- command line


def _number_list(cast: type) -> Any:
    def parse(text: str) -> list:
        try:
            values = [cast(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
        if not values or any(not v > 0 for v in values):  # `not >` also refuses nan
            raise argparse.ArgumentTypeError(f"every value must be positive, got {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:1234 (a trailing /v1 is fine)")
    # SUPPRESS: when absent, mistralrs-jax's global --api-key (or $MISTRALRS_API_KEY) stays in effect.
    parser.add_argument("--api-key", default=argparse.SUPPRESS, help="bearer token, if the server wants one")
    parser.add_argument("--model", help="model id to request (default: the first one /v1/models lists)")
    parser.add_argument("--endpoint", choices=tuple(ENDPOINTS), default="chat",
                        help="chat (/v1/chat/completions) or completions (/v1/completions); default chat")
    parser.add_argument("--concurrency", type=_number_list(int), default=[],
                        help="closed-loop levels: clients in flight, e.g. 1,4,16")
    parser.add_argument("--request-rate", type=_number_list(float), default=[],
                        help="open-loop levels: Poisson arrivals per second, e.g. 0.5,1,inf")
    parser.add_argument("--max-concurrency", type=int, help="cap on requests in flight for --request-rate levels")
    parser.add_argument("--num-requests", type=int, default=20, help="requests per level (default 20)")
    parser.add_argument("--prompt-words", type=int, default=48, help="words per prompt (~1.3 tokens each; default 48)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per request (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at end-of-sequence (outputs then vary in length)")
    parser.add_argument("--warmup-requests", type=int, default=1, help="untimed requests first (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and the Poisson arrivals")
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--out", default="results", help="folder to create the result folder in (default results/)")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG (no matplotlib needed)")


def config_from_args(args: argparse.Namespace) -> ServingConfig:
    if not args.concurrency and not args.request_rate:
        args.concurrency = [1, 4, 16]
    if args.num_requests < 1 or args.max_tokens < 1 or args.prompt_words < 1:
        raise BenchmarkError("--num-requests, --max-tokens and --prompt-words must be at least 1")
    return ServingConfig(url=args.url, api_key=getattr(args, "api_key", None), model=args.model, endpoint=args.endpoint,
                         concurrency=args.concurrency, request_rates=args.request_rate,
                         max_concurrency=args.max_concurrency, num_requests=args.num_requests,
                         prompt_words=args.prompt_words, max_tokens=args.max_tokens, temperature=args.temperature,
                         ignore_eos=args.ignore_eos, warmup_requests=args.warmup_requests, seed=args.seed,
                         timeout_s=args.timeout_s, out=args.out, plot=args.plot)


def run(config: ServingConfig) -> tuple[dict[str, Any], Path]:
    """Run the sweep and write its files: (result, folder)."""
    result = asyncio.run(run_sweep(config))
    return result, write_results(result, config.out, plot=config.plot)


def run_from_args(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would bury the table
    try:
        result, folder = run(config_from_args(args))
    except BenchmarkError as exc:
        print(f"serving benchmark: error: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(result))
    print(f"wrote {folder}/serving.json, serving.md" + (", serving.png" if args.plot else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
