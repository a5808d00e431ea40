"""The ``qllm-jax`` command.

    qllm-jax serve [MODEL_DIR] --host 127.0.0.1 --port 8000 --state-dir DIR [engine flags]
    qllm-jax serve ... --coordinator HOST:PORT --num-processes N --process-id I  # one per host
    qllm-jax launch --num-processes N [--devices-per-process D] -- serve ...  # N on this machine
    qllm-jax generate "prompt" [--max-tokens N --temperature T ...] [engine flags]
    qllm-jax job run INPUT.jsonl --job-dir DIR [engine flags]   # validate, run, checkpoint
    qllm-jax job resume DIR [--recompute] [engine flags]        # after a kill or a restart
    qllm-jax job status DIR [--json]
    qllm-jax job cancel DIR

Every subcommand that runs a model takes one set of engine flags (``--model DIR|random:PRESET``,
the built-in model by default; ``--dtype``, ``--quantize``, policy and KV knobs). ``job run``
records the flags it was given in the job's directory, and ``job resume`` reuses them unless
told otherwise, so a resume needs nothing but the directory. SIGTERM or SIGINT makes a running
job write a checkpoint and exit 0; ``job resume`` continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# flags that are Engine keywords of the same name (flags left unset keep the Engine's defaults)
_ENGINE_FLAGS = (
    "dtype",
    "quantize",
    "policy",
    "granularity",
    "mode",
    "preset",
    "kv_pages",
    "kv_bytes",
    "page_size",
    "max_model_len",
    "max_batch_size",
    "max_num_batched_tokens",
    "prefill_chunk",
    "expert_group_size",
    "expert_parallel",
    "tensor_parallel",
    "compilation_cache_dir",
    "grow_pages",
    "swap_space",
    "redundant_experts",
    "rebalance_every",
    "eplb_ranks",
    "expert_stats_every",
)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine flags every model-running subcommand shares (defaults: None = unset)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", help="HF checkpoint dir, or random:PRESET (default: built-in)")
    g.add_argument("--seed", type=int, help="weights seed of a random:PRESET model (default 0)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"])
    g.add_argument(
        "--quantize",
        choices=["int8"],
        help="weight-only int8 attention and expert matrices, per-channel scales (default: off)",
    )
    g.add_argument("--policy", choices=["fcfs", "priority", "qllm"])
    g.add_argument("--granularity", choices=["layer", "expert"])
    g.add_argument("--mode", choices=["fused", "segmented"])
    g.add_argument("--preset", help="a named set of scheduler options (e.g. paper)")
    g.add_argument("--kv-pages", type=int)
    g.add_argument("--kv-bytes", type=int)
    g.add_argument("--page-size", type=int)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-batch-size", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--prefill-chunk", type=int)
    g.add_argument("--expert-group-size", type=int)
    g.add_argument(
        "--expert-parallel", type=int, help="devices on the mesh's 'expert' axis (default 1)"
    )
    g.add_argument(
        "--tensor-parallel", type=int, help="devices on the mesh's 'tensor' axis (default 1)"
    )
    g.add_argument("--compilation-cache-dir", help="'none' turns the persistent cache off")
    g.add_argument(
        "--redundant-experts", type=int, help="extra expert slots per layer (hot expert copies)"
    )
    g.add_argument(
        "--rebalance-every", type=int, help="re-place experts from their load every N steps"
    )
    g.add_argument(
        "--eplb-ranks",
        type=int,
        help="expert-axis ranks the placement packs onto (on a mesh: 1 or --expert-parallel)",
    )
    g.add_argument(
        "--expert-stats-every", type=int, help="read expert load back every N steps (0: never)"
    )
    g.add_argument(
        "--grow-pages",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="KV pages as sequences grow, evicting idle less urgent requests when short "
        "(default: on for serve, off otherwise: pages for prompt + max_tokens at admission)",
    )
    g.add_argument(
        "--swap-space",
        type=float,
        help="GiB of host memory for the KV pages of evicted requests, copied back instead of "
        "recomputed when they are readmitted (default: 4 for serve, 0 otherwise)",
    )


def engine_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The engine flags given on the command line (model included), as plain data."""
    given = {k: getattr(args, k) for k in ("model", "seed", *_ENGINE_FLAGS)}
    return {k: v for k, v in given.items() if v is not None}


def build_engine(flags: dict[str, Any], cluster=None):
    """An ``Engine`` from engine flags (``engine_flags``' form); with a ``multiprocess.Cluster``,
    its weights and KV cache on the cluster's global mesh."""
    import qllm_jax

    kw = {k: v for k, v in flags.items() if k in _ENGINE_FLAGS}
    if kw.get("compilation_cache_dir") == "none":
        kw["compilation_cache_dir"] = None
    dtype = kw.pop("dtype", "auto")
    spec = flags.get("model")
    if spec is None:
        model: Any = qllm_jax.builtin_model_dir()
    elif spec.startswith("random:"):
        model = qllm_jax.random_model(
            spec.removeprefix("random:"),
            "bfloat16" if dtype == "auto" else dtype,
            seed=flags.get("seed", 0),
            quantize=kw.get("quantize"),
        )
    else:
        model = spec
    if cluster is None:
        return qllm_jax.Engine(model, dtype=dtype, **kw)
    return cluster.engine(model, dtype=dtype, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qllm-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    serve.add_argument("model_dir", nargs="?", help="HF checkpoint dir (default: built-in)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--state-dir", default="qllm-state", help="uploaded files and batches (durable jobs)"
    )
    serve.add_argument("--served-model-name", help="the model's id in the API (default: dir name)")
    serve.add_argument(
        "--max-waiting-ls",
        type=int,
        default=256,
        help="latency-sensitive requests waiting for admission before a 429",
    )
    serve.add_argument(
        "--ls-delivery-wait-ms",
        type=float,
        default=5.0,
        help="after a step that gave latency-sensitive requests their first tokens, wait at "
        "most this long for the event loop to write them before the next step (0: off)",
    )
    serve.add_argument("--max-upload-bytes", type=int, default=200 << 20)
    serve.add_argument(
        "--checkpoint-every", type=float, default=60.0, help="seconds between batch checkpoints"
    )
    serve.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compile every executable before serving",
    )
    serve.add_argument("--log-level", default="info")
    _add_replica_args(serve)
    add_engine_args(serve)
    add_cluster_args(serve)
    serve.set_defaults(func=_serve)

    launch = sub.add_parser(
        "launch", help="start the N processes of a multi-process serve on this machine"
    )
    launch.add_argument("--num-processes", type=int, required=True)
    launch.add_argument("--coordinator-port", type=int, help="default: a free port")
    launch.add_argument(
        "--devices-per-process",
        type=int,
        help="simulated CPU devices per process (XLA_FLAGS host platform device count)",
    )
    launch.add_argument("command", nargs=argparse.REMAINDER, help="-- serve [serve flags]")
    launch.set_defaults(func=_launch)

    gen = sub.add_parser("generate", help="one completion from the shell")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sample-seed", type=int, help="sampling seed")
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)

    job = sub.add_parser("job", help="durable best-effort jobs (OpenAI Batch API files)")
    jobs = job.add_subparsers(dest="job_command")

    run = jobs.add_parser("run", help="validate an input file and run it as a job")
    run.add_argument("input", help="OpenAI Batch API input (JSONL)")
    run.add_argument("--job-dir", required=True, help="a new or empty directory for the job")
    run.add_argument("--priority", type=int, default=1, help="best-effort level, >= 1")
    _add_run_args(run)
    add_engine_args(run)
    run.set_defaults(func=_job_run)

    resume = jobs.add_parser("resume", help="continue a job from its last checkpoint")
    resume.add_argument("job_dir")
    resume.add_argument(
        "--recompute",
        action="store_true",
        help="accept a checkpoint of another model, dtype or page size: re-prefill from tokens",
    )
    _add_run_args(resume)
    add_engine_args(resume)
    resume.set_defaults(func=_job_resume)

    st = jobs.add_parser("status", help="a job's status and request counts")
    st.add_argument("job_dir")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=_job_status)

    cancel = jobs.add_parser("cancel", help="cancel a job (running or not)")
    cancel.add_argument("job_dir")
    cancel.set_defaults(func=_job_cancel)
    return parser


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (one process per host; process 0 serves HTTP)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=30,
        help="seconds before a silent process counts as dead and all processes stop",
    )


def _join_cluster(args: argparse.Namespace):
    """``multiprocess.initialize`` from the cluster flags (None without ``--coordinator``)."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if all(x is None for x in given):
        return None
    if any(x is None for x in given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    from qllm_jax import multiprocess

    return multiprocess.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        heartbeat_timeout_s=args.heartbeat_timeout,
    )


def _add_replica_args(p: argparse.ArgumentParser) -> None:
    """``serve --replicas N``: N engine replicas on Ray Serve (``qllm_jax.ray_serve``)."""
    from qllm_jax.scheduler.dispatch import POLICIES

    g = p.add_argument_group("replicas (Ray Serve; needs the 'ray' extra)")
    g.add_argument("--replicas", type=int, help="engine replicas behind one HTTP front")
    g.add_argument(
        "--router", choices=sorted(POLICIES), help="dispatch policy over replicas (default: ours)"
    )
    g.add_argument(
        "--ray-address", help="join this Ray cluster (e.g. 'auto'); default: start a local one"
    )
    g.add_argument("--replica-cpus", type=float, help="CPUs each replica reserves (default 1)")
    g.add_argument("--replica-gpus", type=float, help="GPUs each replica reserves (default 0)")
    g.add_argument(
        "--stats-period", type=float, help="seconds between load-signal reads (default 0.1)"
    )
    g.add_argument(
        "--retries", type=int, help="re-sends of a request whose replica died (default 2)"
    )


_REPLICA_FLAGS = {
    "router": "router",
    "replica_cpus": "replica_cpus",
    "replica_gpus": "replica_gpus",
    "stats_period": "stats_period_s",
    "retries": "retries",
}


def _serve_replicas(args: argparse.Namespace, flags: dict[str, Any]) -> int:
    """``serve --replicas N``: the Ray Serve app, until interrupted."""
    try:
        from qllm_jax import ray_serve
    except ImportError as e:
        print(f"qllm-jax: --replicas needs Ray Serve: pip install 'qllm-jax[ray]' ({e})",
              file=sys.stderr)  # fmt: skip
        return 1
    given = {v: getattr(args, k) for k, v in _REPLICA_FLAGS.items() if getattr(args, k) is not None}
    try:
        opts = ray_serve.ReplicaOptions(
            num_replicas=args.replicas,
            warmup=args.warmup,
            max_waiting_ls=args.max_waiting_ls,
            **given,
        )
    except ValueError as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 2
    print(
        f"qllm-jax: {opts.num_replicas} replicas on Ray Serve, router={opts.router}, "
        f"at http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    try:
        ray_serve.start(
            flags,
            opts,
            host=args.host,
            port=args.port,
            ray_address=args.ray_address,
            served_model_name=args.served_model_name,
            blocking=True,
        )
    except KeyboardInterrupt:  # (Ctrl-C / SIGINT: the app goes down with the process)
        ray_serve.stop()
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-every", type=float, default=60.0, help="seconds between checkpoints"
    )
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None)
    bar.add_argument("--no-progress", dest="progress", action="store_false")


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from qllm_jax import server

    flags = engine_flags(args)
    if args.model_dir is not None:
        if "model" in flags:
            print("qllm-jax: give MODEL_DIR or --model, not both", file=sys.stderr)
            return 2
        flags["model"] = args.model_dir
    flags.setdefault("grow_pages", True)  # clients often omit max_tokens
    if args.coordinator is None:  # (KV swap does not work across processes yet)
        flags.setdefault("swap_space", 4.0)  # evicted requests swap their KV (vLLM's default)
    if args.replicas is not None:
        if args.coordinator is not None:
            print("qllm-jax: --replicas or --coordinator, not both", file=sys.stderr)
            return 2
        return _serve_replicas(args, flags)
    ray_only = [k for k in ("ray_address", *_REPLICA_FLAGS) if getattr(args, k) is not None]
    if ray_only:
        print(f"qllm-jax: --{ray_only[0].replace('_', '-')} needs --replicas", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    # The engine thread and the event loop share the GIL: a shorter switch interval than
    # CPython's 5 ms keeps the event loop from waiting that long behind the engine's host code.
    sys.setswitchinterval(0.0005)
    try:
        cluster = _join_cluster(args)
        engine = build_engine(flags, cluster)
        if cluster is not None and not cluster.leader:
            return _follow(cluster, engine)
        if cluster is not None:
            cluster.lead(engine)
        state = server.build_state(
            engine,
            args.state_dir,
            args.served_model_name,
            max_waiting_ls=args.max_waiting_ls,
            ls_delivery_wait_s=args.ls_delivery_wait_ms / 1000,
            max_upload_bytes=args.max_upload_bytes,
            # a multi-process engine cannot export KV to one host: batches run, undurable
            checkpoint_every=args.checkpoint_every if cluster is None else None,
        )
    except (ValueError, OSError) as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 1
    if args.warmup:
        t0 = time.monotonic()
        n = engine.warmup()
        print(
            f"qllm-jax: warmed up {n} executables in {time.monotonic() - t0:.1f} s", file=sys.stderr
        )
    resumed = server.resume_batches(state)
    if resumed:
        print(f"qllm-jax: resumed batches {', '.join(resumed)}", file=sys.stderr)
    cfg = engine.config
    print(
        f"qllm-jax: serving {state.model_name} ({engine.model.path}, {engine.model.dtype}) "
        f"policy={cfg.policy} granularity={cfg.granularity} mode={engine.mode} "
        f"kv_pages={cfg.num_pages - 1}x{cfg.page_size} max_model_len={cfg.max_model_len} "
        f"state_dir={args.state_dir} at http://{args.host}:{args.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    app = server.create_app(state)
    if cluster is None:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
        return 0
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return _serve_cluster(uvicorn.Server(config), state.loop, cluster)


def _serve_cluster(http, loop, cluster) -> int:
    """Process 0 of a multi-process engine: serve until SIGINT/SIGTERM or until the engine
    loop dies (its processes no longer agree, so it cannot serve again), then stop the
    followers. uvicorn's own signal handling would re-raise the signal after its shutdown
    and kill the process before the followers are told; these handlers only ask it to exit."""
    from qllm_jax import multiprocess

    def exit_(signum=None, frame=None) -> None:
        http.should_exit = True

    http.capture_signals = contextlib.nullcontext
    old = {s: signal.signal(s, exit_) for s in (signal.SIGINT, signal.SIGTERM)}

    def watch() -> None:
        while loop.error is None and not http.should_exit:
            time.sleep(0.2)
        exit_()

    threading.Thread(target=watch, daemon=True).start()
    try:
        http.run()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    try:
        if isinstance(loop.error, multiprocess.ClusterError):
            raise loop.error
        cluster.stop()
    except multiprocess.ClusterError as e:
        # the followers are gone or disagree: waiting for them in the runtime's shutdown
        # barrier would only delay the exit
        print(f"qllm-jax: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    if loop.error is not None:
        print(f"qllm-jax: the engine loop died: {loop.error}", file=sys.stderr)
        return 1
    return 0


def _follow(cluster, engine) -> int:
    """A follower process: run process 0's plans until it stops. On an error, leave at once
    (process 0 finds the report at its next barrier, or misses the heartbeats) rather than
    wait in the runtime's shutdown barrier."""
    try:
        n = cluster.follow(engine)
    except Exception as e:  # noqa: BLE001 -- follow() has reported it to process 0
        print(f"qllm-jax: process {cluster.process_id}: {e!r}", file=sys.stderr, flush=True)
        os._exit(1)
    cluster.stop()
    print(f"qllm-jax: process {cluster.process_id} ran {n} plans; stopped", file=sys.stderr)
    return 0


def _launch(args: argparse.Namespace) -> int:
    """``multiprocess.launch`` of ``qllm-jax serve ...`` (the words after ``--``)."""
    from qllm_jax import multiprocess

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command[:1] != ["serve"]:
        print("qllm-jax: launch runs serve: qllm-jax launch ... -- serve [flags]", file=sys.stderr)
        return 2
    try:
        return multiprocess.launch(
            command, args.num_processes, args.coordinator_port, args.devices_per_process
        )
    except ValueError as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    import qllm_jax

    try:
        engine = build_engine(engine_flags(args))
        sampling = qllm_jax.SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sample_seed,
            stop=args.stop or (),
        )
        rid = engine.add_request(args.prompt, sampling)
    except (ValueError, TypeError, OSError) as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 1
    out = None
    while engine.has_unfinished():
        for update in engine.step():
            if update.request_id == rid:
                out = update
    print(out.text if out.text is not None else out.token_ids)
    print(
        f"qllm-jax: {len(out.token_ids)} tokens, finish_reason={out.finish_reason}", file=sys.stderr
    )
    return 0


def _job_run(args: argparse.Namespace) -> int:
    flags = engine_flags(args)

    def start(runner):
        return runner.create(
            args.input, args.job_dir, priority=args.priority, metadata={"engine": flags}
        )

    return _drive(args, flags, start)


def _job_resume(args: argparse.Namespace) -> int:
    from qllm_jax import jobs

    try:
        manifest = jobs._read_manifest(jobs.JobPaths(Path(args.job_dir)))
    except jobs.JobError as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 1
    flags = manifest.get("metadata", {}).get("engine", {}) | engine_flags(args)
    return _drive(args, flags, lambda runner: runner.resume(args.job_dir, args.recompute))


def _drive(args: argparse.Namespace, flags: dict[str, Any], start) -> int:
    """Build the engine, start the job, run it; on SIGTERM/SIGINT checkpoint and exit 0."""
    from qllm_jax import checkpoint, jobs

    stop = _StopFlag()
    try:
        engine = build_engine(flags)
        runner = jobs.JobRunner(engine, checkpoint_every=args.checkpoint_every, keep=args.keep)
        job = start(runner)
    except (jobs.JobError, checkpoint.JobCheckpointError, ValueError, OSError) as e:
        for err in getattr(e, "errors", [])[:20]:  # JobInputError: every bad line
            print(f"qllm-jax: line {err['line']}: {err['message']}", file=sys.stderr)
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 1
    if job.finished:
        _print_status(jobs.status(job.dir))
        return 0
    for note in job.notes:
        print(f"qllm-jax: {note}", file=sys.stderr)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    print(f"qllm-jax: job {job.id}: {job.num_done}/{job.total} done", file=sys.stderr)
    try:
        finished = runner.run(job, should_stop=stop, progress=progress)
        if not finished:
            t0 = time.monotonic()
            step = runner.suspend(job)
            print(
                f"qllm-jax: stopped by {stop.signal_name}; checkpoint {step} written in "
                f"{time.monotonic() - t0:.2f} s. Resume with: qllm-jax job resume {job.dir}",
                file=sys.stderr,
            )
            return 0
    except (checkpoint.JobCheckpointError, OSError) as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 1
    finally:
        stop.restore()
    _print_status(jobs.status(job.dir))
    return 0


def _job_status(args: argparse.Namespace) -> int:
    from qllm_jax import jobs

    try:
        st = jobs.status(args.job_dir)
    except jobs.JobError as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
    else:
        _print_status(st)
    return 0


def _job_cancel(args: argparse.Namespace) -> int:
    from qllm_jax import jobs

    try:
        _print_status(jobs.cancel(args.job_dir))
    except jobs.JobError as e:
        print(f"qllm-jax: {e}", file=sys.stderr)
        return 1
    return 0


def _print_status(st) -> None:
    print(
        f"{st.id}: {st.status}, {st.completed} completed, {st.failed} failed, "
        f"{st.total} total\n  output: {st.output_file}\n  errors: {st.error_file}"
    )
    for err in st.errors[:20]:
        print(f"  line {err.get('line')}: {err.get('message')}")


class _StopFlag:
    """Turns SIGTERM and SIGINT into a flag the run loop polls between engine steps (a second
    signal interrupts at once)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def __call__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
