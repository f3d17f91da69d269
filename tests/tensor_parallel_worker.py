"""The tensor-parallel checks' engine side, run as a separate process by test_tensor_parallel.py.

XLA_FLAGS=--xla_force_host_platform_device_count=N must be set before JAX starts, so the
test launches this script with it; the pytest process itself keeps its one device.

    python tests/tensor_parallel_worker.py JOBS.json OUT_DIR

JOBS.json is a list of {"name", "kind", ...}; each job's result goes to OUT_DIR/NAME.json
(plain values) and OUT_DIR/NAME.npz (arrays). A job that raises records the exception's
type and message instead, so the other jobs still run.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def _greedy(max_tokens: int):
    from mistralrs_jax import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def sharding_facts(llm) -> dict:
    """What the weights and KV cache look like on the mesh: per-leaf specs and per-device bytes."""
    runner = llm.engine.runner
    leaves = runner.state_leaves
    specs = [str(getattr(leaf.sharding, "spec", "")) for leaf in leaves]
    split = [i for i, leaf in enumerate(leaves) if "tp" in specs[i]]
    return {
        "num_leaves": len(leaves),
        "num_split_leaves": len(split),
        "split_leaf_bytes": int(sum(leaves[i].nbytes for i in split)),
        # bytes of each split leaf's shard, per device: each must be the leaf's bytes / N
        "split_shard_fractions": sorted({round(s.data.nbytes / leaves[i].nbytes, 6)
                                         for i in split for s in leaves[i].addressable_shards}),
        "kv_spec": str(runner.kv_caches[0][0].sharding.spec) if runner.mesh is not None else None,
        "kv_shape": list(runner.kv_caches[0][0].shape),
        "mesh": runner.mesh_report(),
        "attention_projection_specs": _projection_specs(llm),
    }


def _projection_specs(llm) -> dict:
    """{"q_proj": spec, ...} of the first layer's projections as placed on the mesh."""
    from flax import nnx

    model = llm.engine.runner._model(llm.engine.runner.state_leaves)
    found = {}
    for path, node in nnx.iter_graph(model):
        if len(path) >= 2 and path[0] == "layers" and path[1] == 0 and path[-1] in ("weight", "blocks", "gate", "down"):
            owner = path[-2] if path[-1] in ("weight", "blocks") else path[-1]
            value = node[...] if hasattr(node, "__getitem__") else node
            found[f"{owner}.{path[-1]}"] = str(getattr(value.sharding, "spec", None))
    return found


def job_generate(job: dict, out: dict, arrays: dict) -> None:
    """Score and greedy-generate with one engine: the tp engine of `job` (LLM kwargs)."""
    import os

    from mistralrs_jax import LLM

    os.environ.update(job.get("env", {}))
    with LLM(**job["llm"]) as llm:
        if job.get("re_isq"):  # re-quantize the split dense model while serving
            llm.generate(job["prompts"], _greedy(2))
            llm.re_isq(job["re_isq"])
        if job.get("score_ids"):
            arrays["logits"] = llm.score(job["score_ids"])
        outs = llm.generate(job["prompts"], _greedy(job["max_tokens"]))
        out["tokens"] = [o.outputs[0].token_ids for o in outs]
        out["facts"] = sharding_facts(llm)
        stats = llm.engine.stats()
        out["compiles_after_warmup"] = stats["compiles_after_warmup"]
        out["spec_acceptance_rate"] = stats.get("spec_acceptance_rate")
    for key in job.get("env", {}):
        os.environ.pop(key)


def job_batching(job: dict, out: dict, arrays: dict) -> None:
    """Solo runs, then the same prompts all at once through a pool too small for them (preemption),
    a second round sharing a prefix (prefix cache); compiles counted after warm-up."""
    from engine_helpers import wait_for_idle

    from mistralrs_jax import LLM

    with LLM(**job["llm"]) as llm:
        prompts, n = job["prompts"], job["max_tokens"]
        out["solo"] = [llm.generate([p], _greedy(n))[0].outputs[0].token_ids for p in prompts]
        wait_for_idle(llm)
        llm.block_manager.reset_prefix_cache()
        before = llm.metrics()
        handles = [llm.engine.add_request(p, _greedy(n)) for p in prompts]
        out["batched"] = [h.result(timeout=600).outputs[0].token_ids for h in handles]
        middle = wait_for_idle(llm)
        shared = [job["shared_prefix"] + p[-4:] for p in prompts]
        out["shared_solo"] = [llm.generate([p], _greedy(n))[0].outputs[0].token_ids for p in shared[:1]]
        out["shared_batched"] = [o.outputs[0].token_ids for o in llm.generate(shared, _greedy(n))]
        after = wait_for_idle(llm)
        out["preempted"] = middle["num_preempted"] - before["num_preempted"]
        out["prefix_hits"] = after["prefix_cache_hits"] - middle["prefix_cache_hits"]
        out["compiles_after_warmup"] = after["compiles_after_warmup"]
        out["blocks_free_at_end"] = [after["kv_blocks_free"], after["kv_blocks_total"]]
        out["status"] = _server_status(llm)


def _server_status(llm) -> dict:
    """GET /v1/status from the real server on loopback around `llm`."""
    import httpx

    from server.app import create_app
    from server.serving import BackgroundServer

    with BackgroundServer(create_app(llm, default_seed=0)) as server:
        return httpx.get(f"{server.url}/v1/status", timeout=60).json()


def job_refused(job: dict, out: dict, arrays: dict) -> None:
    """LLM(...) (or, with "re_isq", its re_isq) must raise: record the exception."""
    from mistralrs_jax import LLM

    try:
        with LLM(**job["llm"]) as llm:
            if job.get("re_isq"):
                llm.re_isq(job["re_isq"])
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        out["error_type"] = type(exc).__name__
        out["error_mro"] = [c.__name__ for c in type(exc).__mro__]
        out["error"] = str(exc)
        return
    out["error_type"] = None


JOBS = {"generate": job_generate, "batching": job_batching, "refused": job_refused}


def main(jobs_path: str, out_dir: str) -> None:
    import jax

    out_root = Path(out_dir)
    print(f"{len(jax.devices())} devices", flush=True)
    for job in json.loads(Path(jobs_path).read_text()):
        out, arrays, start = {}, {}, time.perf_counter()
        try:
            JOBS[job["kind"]](job, out, arrays)
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            out["failed"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        out["seconds"] = time.perf_counter() - start
        print(f"{job['name']}: {out['seconds']:.1f}s{' FAILED' if 'failed' in out else ''}", flush=True)
        (out_root / f"{job['name']}.json").write_text(json.dumps(out, default=str))
        np.savez(out_root / f"{job['name']}.npz", **arrays)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(Path(__file__).parent.parent))  # server/
    main(*sys.argv[1:3])
