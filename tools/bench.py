"""Training throughput, FracTrain's step time against its BitOPs, peak memory and cold start, in one run.

    python -m tools.bench [--rounds 5] [--steps 3] [--warmup 2] [--threads 2 | --threads 1,2] [--json] [--out FILE]
                          [--cases resnet20-b128,...,resnet8-b8,mobilenetv2-b8,lenet5-b8] [--backends all|numba,...]
                          [--mixes 3/6 0:0.5,6/8:0.5] [--dfq-mixes 0:0.5,8/8:0.5] [--no-fractrain]
                          [--no-fp32] [--profile]
                          [--no-cold-start | --cold-start-model resnet20 --cold-start-batch 128 --fresh-cache]

Cases: ResNet-20 (batch 128 and 32), ResNet-8 and the MLP at batch 128, and at batch 8 (where on-device
fine-tuning runs) ResNet-8, MobileNetV2 (width 0.35, 32x32) and LeNet-5. Paths, per case: edgetrain's
integer path at static 8/8, FracTrain at each `--mixes` mix (ResNet cases only), edgetrain's fp32
path, PyTorch fp32 as the reference (a twin of the same architecture, `bench_step._torch_model`), and
with `--backends` the integer path once per integer route (`all`: every route `routes.usable_routes`
passes on this machine; a named route that is not usable steps down as `use_backend` does, and the
row names the route actually taken). Every path runs in its own worker process, set up once. The parent then runs
`--rounds` rounds; in each round every worker in turn runs `--steps` training steps or more (so
that a turn lasts `--min-turn` seconds; a rotating order, `--gap` seconds apart so one worker's
spinning OpenMP threads have gone idle before the next starts), so a burst of load from other
processes on a shared machine hits all paths alike instead of whichever happened to run then.
Reported per path: images/s from the median step time over all rounds, the ratio to PyTorch fp32 (of
the median step times; the range of the per-round ratios shows how noisy the machine was), and the
worker's resident memory after setup and at its peak (ru_maxrss: imports, model, and the largest
step's activations and scratch; and Numba's compiler where a worker compiled kernels, which the run
then says: run again for memory figures). `--profile` adds milliseconds per op type and direction of one step.

Thread scaling: `--threads 1,2` runs every case at each thread count (a case's paths always share
one count) and reports, per path, the speedup from the fewest to the most threads, the parallel
fraction p that speedup implies (Amdahl: S = 1 / ((1 - p) + p / T)), and what p predicts for a
4-core board. What to expect there (reasoned, not measured on a board): at batch 128 nearly all of
a step is kernel work split over images and output rows (p near 0.9, so about 3x on 4 cores), less
where memory bandwidth, not arithmetic, bounds the elementwise ops; at batch 8 much less (p perhaps
0.3 to 0.6, so 1.3x to 1.8x), because the per-layer Python constant does not parallelise at all, every
kernel call under `threads.SMALL_WORK` multiply-accumulates runs on one thread on purpose, and the
elementwise kernels under `threads.SMALL_ELEMENTS` values run serially. More threads never change a
result (fixed reduction orders), only time. The extrapolation assumes the board's cores are like these
and idle; a narrower memory bus lowers it. On a shared machine whose load exceeds its cores the figure
means little: every parallel region waits for a descheduled worker (measured on the 2-core development
machine at load 6: ResNet-8 b8 steps 4 to 6 times slower at 2 threads than at 1, PyTorch's too).

DFQ mix (`--dfq-mixes`): the same, on the candidates an 8-bit integer unit has (0 = skip, 8/8 with
8-bit weights), where skipping is the only time saved; default half the samples skipping every block.
Bar: time% <= BitOPs% + 9 (issue 18: at most 60% of static 8/8's time at its 51% of the BitOPs).

FracTrain mix: the int 8/8 model with DFQ on its residual blocks (edgetrain.precision.dfq.controller, FracTrain's
candidates
0 = skip, 3/6, 4/6, 4/8, 6/8, 6/12, weights at 4 bits) and every gate forced to a fixed share of the
batch per candidate, samples shuffled with a fixed seed, so the step is reproducible. A mix is "3/6"
(every sample on one candidate) or "0:0.5,6/8:0.5" (shares); the defaults are 3/6, what the gates chose
for every block at the end of our ResNet-8 FracTrain experiment, and half the samples skipping each
block at 6/8 otherwise. Per mix: the step's BitOPs (the trainer's per-step figure) in percent of static
8/8's, its step time in percent of static 8/8's from the same rounds, and the bar: a step whose BitOPs
are X% of static 8/8's takes at most X% + 15 points of its time.

Cold start (on unless `--no-cold-start`): a new `python` process imports edgetrain, builds
`--cold-start-model` at 8/8 and runs one training step (forward, backward, SGD update) at
`--cold-start-batch`; reported are the wall time from just before the parent starts it to the step's
end (the child's clock), and the child's split: interpreter start, imports, model build, first step.
It runs twice: the first process fills Numba's on-disk cache if it is empty (the kernels are
`cache=True`; index files beside their sources in __pycache__ unless NUMBA_CACHE_DIR says otherwise),
the second starts with it warm. Bar (issue 18): the warm process finishes its first step within 1.5 seconds.
`--fresh-cache` points both at a new, empty NUMBA_CACHE_DIR, so the first is a true first run ever.
Python's own bytecode cache is treated like Numba's: both processes may write and read `__pycache__/*.pyc`,
as Python does by default and as every `pip install` prepares, even where the environment sets
PYTHONDONTWRITEBYTECODE (without .pyc files every process compiles edgetrain's ~100 modules from source:
0.25 s more on a 2-core Zen 3); the JSON says which applied (`python_bytecode`).

`--json` prints JSON for tools instead of the table; `--out` also writes it. GOP counts are not
reported here; `tools/bench_kernels.py` times the kernels alone.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = {  # key: (label, builder name, batch, input shape per sample)
    "resnet20-b128": ("ResNet-20 b128", "resnet20", 128, (3, 32, 32)),
    "resnet20-b32": ("ResNet-20 b32", "resnet20", 32, (3, 32, 32)),
    "resnet8-b128": ("ResNet-8 b128", "resnet8", 128, (3, 32, 32)),
    "mlp-b128": ("MLP b128", "mlp", 128, (784,)),
    # batch 8: on-device fine-tuning, where per-layer constant costs weigh most
    "resnet8-b8": ("ResNet-8 b8", "resnet8", 8, (3, 32, 32)),
    "mobilenetv2-b8": ("MobileNetV2-0.35 b8", "mobilenetv2", 8, (3, 32, 32)),
    "lenet5-b8": ("LeNet-5 b8", "lenet5", 8, (1, 28, 28)),
}
# Builder options per model, the same for edgetrain's model and its PyTorch twin.
MODEL_KWARGS = {"mobilenetv2": {"width_mult": 0.35}}
SHAPES = {name: shape for _, name, _, shape in CASES.values()}  # cold start: input shape per model
BOARD_THREADS = 4  # the 4-core board the thread-scaling extrapolation is for
TORCH = "torch fp32"
PREFIX = "@@bench "  # worker replies are the stdout lines that start with this
FRACTRAIN = "fractrain:"  # path key prefix; the mix text follows
DEFAULT_MIXES = ("3/6", "0:0.5,6/8:0.5")
BAR_POINTS = 15.0  # FracTrain bar: time% <= BitOPs% + this many points of static 8/8's
# DFQ on the candidates an 8-bit integer unit really has: skip the block, or compute it at 8/8 with
# 8-bit weights. Skipping is the only time this saves, so its bar is tighter: the 60% of
# static's time at 51% of its BitOPs (half the samples skipping every block of ResNet-20) is BitOPs + 9.
DFQ = "dfq:"
DFQ_CANDIDATES = ("0", "8/8")
DFQ_WEIGHT_BITS = 8
DEFAULT_DFQ_MIXES = ("0:0.5,8/8:0.5",)
DFQ_BAR_POINTS = 9.0
COLD_START_BAR_S = 1.5  # issue 18: a warm-cache process finishes its first ResNet-20 step within this
# Issue 18's throughput bars at batch 128 (static 8/8 images/s against PyTorch fp32's); at batch 8 every case's is 1.0
THROUGHPUT_BARS = {"resnet20-b128": 2.0, "resnet20-b32": 1.5, "resnet8-b128": 1.5, "mlp-b128": 1.3}


def _label(path: str) -> str:
    """Path key -> display name: int8, int8@numba, fractrain:<mix>, dfq:<mix>, fp32, torch."""
    if path == "torch":
        return TORCH
    if path == "fp32":
        return "edgetrain fp32"
    if path.startswith(FRACTRAIN):
        return f"edgetrain FracTrain {path[len(FRACTRAIN):]}"
    if path.startswith(DFQ):
        return f"edgetrain DFQ {path[len(DFQ):]}"
    backend = path.partition("@")[2]
    return "edgetrain int 8/8" + (f" [{backend}]" if backend else "")


def _has_blocks(case: str) -> bool:
    """Whether the case's model has residual blocks, which FracTrain gates (and may skip)."""
    return CASES[case][1].startswith("resnet")


# ------------------------------------------------------------------------------------- worker


def _rss_mb() -> float:
    """Resident memory of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _reply(**kw) -> None:
    """Send one reply line to the parent."""
    sys.stdout.write(PREFIX + json.dumps(kw) + "\n")
    sys.stdout.flush()


def limit_threads(threads: int) -> object:
    """Set Numba's and the BLAS/OpenMP pools' threads; return the threadpoolctl limiter, to be kept alive."""
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threadpool_limits(threads)


def worker(path: str, case: str, threads: int) -> int:
    """Set one path up, then answer commands on stdin: run n steps, profile, quit."""
    _, name, batch, shape = CASES[case]
    model_kwargs = MODEL_KWARGS.get(name, {})
    kernel_backend = None
    model = None
    if path == "torch":
        import torch

        torch.set_num_threads(threads)
        from tools.bench_step import make_torch_step
        step = make_torch_step(name, batch, shape, **model_kwargs)
    else:
        _limits = limit_threads(threads)  # kept for the worker's lifetime
        from edgetrain import kernels
        from tools.bench_step import make_edgetrain_step, parse_mix
        mix, dfq_config = None, None
        if path.startswith(FRACTRAIN):
            precision, mix = "int8", parse_mix(path[len(FRACTRAIN):])
        elif path.startswith(DFQ):
            from edgetrain.precision.dfq.config import DFQConfig

            precision, mix = "int8", parse_mix(path[len(DFQ):], DFQ_CANDIDATES)
            dfq_config = DFQConfig(candidates=DFQ_CANDIDATES, weight_bits=DFQ_WEIGHT_BITS)
        else:
            precision, _, backend = path.partition("@")
            if backend:
                kernels.use_backend(backend)  # a route this machine cannot take steps down (logged)
        kernel_backend = kernels.get_backend().name
        step, model = make_edgetrain_step(name, batch, shape, "8/8" if precision == "int8" else "fp32", mix,
                                          dfq_config, **model_kwargs)
    setup_mb = _rss_mb()
    _reply(ready=True, backend=kernel_backend, setup_rss_mb=setup_mb)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            times = []
            for _ in range(cmd["n"]):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            extra = {}
            if model is not None and times:
                from tools.bench_step import step_bitops
                extra["bitops"] = step_bitops(model)  # the same every step: fixed precision, forced mix
            _reply(times=times, **extra)
        elif cmd["cmd"] == "profile":
            _reply(profile=_profile(step, model))
        elif cmd["cmd"] == "quit":
            _reply(peak_rss_mb=_peak_mb())
            return 0
    return 0


def _profile(step, model) -> dict:
    """Milliseconds per op type and direction over one step (the executor's own timings)."""
    if model is None:
        return {}
    model.executor.timings = {}
    step()
    out: dict[str, float] = {}
    op_types = {n.name: n.op_type for n in model.graph.nodes}
    for (node, direction), seconds in model.executor.timings.items():
        if "/" in node:  # inside a gated unit (DFQ): the breakdown of that unit's GatedUnit entry
            inner = node.rsplit("/", 1)[1]
            key = f"GatedUnit > {op_types.get(inner, inner)}.{direction}"
        else:
            key = f"{type(model.executor.ops[node]).__name__}.{direction}"
        out[key] = out.get(key, 0.0) + 1e3 * seconds
    model.executor.timings = None
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def cold_start_child(name: str, batch: int, threads: int) -> int:
    """One new process: import, build `name` at 8/8, one training step; reply with wall-clock marks."""
    t_start = time.time()
    _limits = limit_threads(threads)  # the same threads as the workers
    # timed as imports: bench_step imports edgetrain (numpy, numba, onnx, the kernels) and models
    from tools.bench_step import make_edgetrain_step
    t_import = time.time()
    step, _ = make_edgetrain_step(name, batch, SHAPES[name], "8/8")
    t_build = time.time()
    step()
    t_step = time.time()
    _reply(start=t_start, imported=t_import, built=t_build, step_end=t_step, peak_rss_mb=_peak_mb(),
           writes_bytecode=not sys.dont_write_bytecode)
    return 0


# ------------------------------------------------------------------------------------- parent


class Worker:
    """A worker process for one path of one case, and the pipe to it."""

    def __init__(self, path: str, case: str, threads: int, env: dict | None = None):
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench", "--worker", path, "--case", case, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        self.info = self.read()

    def read(self) -> dict:
        """The worker's next reply."""
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"worker {self.path} exited with {self.proc.wait()}")

    def ask(self, **cmd) -> dict:
        """Send one command and wait for its reply."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()


def _ratio_rounds(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios of two paths' median step times (their turns were seconds apart)."""
    return [a / b for a, b in zip(num, den)]


def fractrain_row(mix: str, bitops: int, static_bitops: int, med: float, static_med: float,
                  per_round: list[float], bar_points: float = BAR_POINTS) -> dict:
    """One FracTrain (or DFQ) mix against static 8/8: BitOPs %, time %, and whether the bar (time% at most
    BitOPs% + bar_points) holds."""
    bitops_pct = 100.0 * bitops / static_bitops
    time_pct = 100.0 * med / static_med
    return {"mix": mix, "bitops": bitops, "static_bitops": static_bitops,
            "bitops_percent_of_static": bitops_pct, "time_percent_of_static": time_pct,
            "time_percent_rounds_range": [100.0 * min(per_round), 100.0 * max(per_round)] if per_round else None,
            "bar_limit_percent": bitops_pct + bar_points, "bar_holds": time_pct <= bitops_pct + bar_points}


def bench_case(case: str, paths: list[str], args, threads: int) -> dict:
    """Run every path of one case at `threads` threads in interleaved rounds; the case's JSON."""
    label, _, batch, _ = CASES[case]
    workers = []
    try:
        for p in paths:
            workers.append(Worker(p, case, threads))
        times: dict[str, list[float]] = {w.path: [] for w in workers}
        rounds: dict[str, list[float]] = {w.path: [] for w in workers}
        steps, bitops = {}, {}
        for w in workers:
            warm = w.ask(cmd="run", n=max(args.warmup, 1))
            if "bitops" in warm:
                bitops[w.path] = warm["bitops"]
            # short steps (the MLP's take milliseconds) run more per turn, so a turn lasts about
            # --min-turn seconds and the first step after the gap does not dominate its median
            steps[w.path] = max(args.steps, int(args.min_turn / max(min(warm["times"]), 1e-6)))
        for r in range(args.rounds):
            order = workers[r % len(workers):] + workers[:r % len(workers)]
            for w in order:
                # Let the previous worker's threads go idle first: OpenMP pools spin for a while
                # after their last parallel region, and would steal this worker's cores.
                time.sleep(args.gap)
                t = w.ask(cmd="run", n=steps[w.path])["times"]
                times[w.path] += t
                rounds[w.path].append(statistics.median(t))
        profiles = {w.path: w.ask(cmd="profile")["profile"] for w in workers} if args.profile else {}
        peaks = {w.path: w.ask(cmd="quit")["peak_rss_mb"] for w in workers}
    finally:
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
    ref = statistics.median(times["torch"]) if "torch" in times else None
    out = {"case": label, "key": case, "batch": batch, "threads": threads, "paths": {}, "fractrain": [], "dfq": []}
    for w in workers:
        med = statistics.median(times[w.path])
        row = {"step_ms": 1e3 * med, "img_s": batch / med, "steps": len(times[w.path]),
               "setup_rss_mb": w.info["setup_rss_mb"], "peak_rss_mb": peaks[w.path]}
        if w.info.get("backend"):
            row["kernel_backend"] = w.info["backend"]
        if w.path in bitops:
            row["bitops"] = bitops[w.path]
        if ref is not None and w.path != "torch":
            # images/s relative to torch: torch's median step time over this path's; and per
            # round, whose spread shows how noisy the machine was
            per_round = _ratio_rounds(rounds["torch"], rounds[w.path])
            row["vs_torch"] = ref / med
            row["vs_torch_rounds_median"] = statistics.median(per_round)
            row["vs_torch_rounds_range"] = [min(per_round), max(per_round)]
        if w.path in profiles:
            row["profile_ms"] = profiles[w.path]
        out["paths"][_label(w.path)] = row
        for prefix, points, rows in ((FRACTRAIN, BAR_POINTS, out["fractrain"]), (DFQ, DFQ_BAR_POINTS, out["dfq"])):
            if w.path.startswith(prefix) and "int8" in bitops:
                fr = fractrain_row(w.path[len(prefix):], bitops[w.path], bitops["int8"], med,
                                   statistics.median(times["int8"]), _ratio_rounds(rounds[w.path], rounds["int8"]),
                                   points)
                row.update({k: fr[k] for k in ("bitops_percent_of_static", "time_percent_of_static", "bar_holds")})
                rows.append({"path": _label(w.path), **fr})
    return out


def numba_cache_state(cache_dir: str | None = None) -> dict:
    """Where Numba keeps edgetrain's compiled kernels on disk, and how many index and compiled files are there."""
    if cache_dir:
        where, pattern = cache_dir, os.path.join(cache_dir, "**")
    else:
        # numba's default: a __pycache__ beside each source file (if writable, as in this checkout)
        where, pattern = os.path.join(ROOT, "edgetrain", "**", "__pycache__"), os.path.join(ROOT, "edgetrain", "**",
                                                                                             "__pycache__")
    index = glob.glob(os.path.join(pattern, "*.nbi"), recursive=True)
    data = glob.glob(os.path.join(pattern, "*.nbc"), recursive=True)
    newest = 0.0
    for path in index + data:
        try:
            newest = max(newest, os.path.getmtime(path))
        except OSError:  # removed meanwhile (edgetrain.numba_caches drops stale caches)
            pass
    return {"location": where, "index_files": len(index), "compiled_files": len(data), "newest_mtime": newest}


def run_cold_start(name: str, batch: int, threads: int, cache_dir: str | None = None, timeout: float = 900) -> dict:
    """Time one new process from just before Popen to the end of its first training step (the child's clock)."""
    env = dict(os.environ)
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = cache_dir
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a warm start reads .pyc files, as by default (module doc)
    before = numba_cache_state(cache_dir or os.environ.get("NUMBA_CACHE_DIR"))
    cmd = [sys.executable, "-m", "tools.bench", "--cold-start-child", name,
           "--cold-start-batch", str(batch), "--threads", str(threads)]
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"cold-start process exited with {proc.returncode}: {tail}")
    m = json.loads(lines[-1][len(PREFIX):])
    after = numba_cache_state(cache_dir or os.environ.get("NUMBA_CACHE_DIR"))
    return {"wall_s": m["step_end"] - t0, "python_start_s": m["start"] - t0, "import_s": m["imported"] - m["start"],
            "build_s": m["built"] - m["imported"], "first_step_s": m["step_end"] - m["built"],
            "peak_rss_mb": m["peak_rss_mb"], "writes_bytecode": m["writes_bytecode"],
            "cache_before": before, "cache_after": after,
            "compiled_kernels": after["compiled_files"] > before["compiled_files"]}  # it wrote new cache entries


def cold_start(name: str, batch: int, threads: int, fresh_cache: bool = False) -> dict:
    """Two new processes one after the other: the first fills Numba's cache if needed, the second finds it warm."""
    cache_dir = tempfile.mkdtemp(prefix="edgetrain-numba-") if fresh_cache else None
    try:
        first = run_cold_start(name, batch, threads, cache_dir)
        warm = run_cold_start(name, batch, threads, cache_dir)
    finally:
        if cache_dir:
            shutil.rmtree(cache_dir, ignore_errors=True)
    first["kind"] = "first process ever (empty cache)" if first["cache_before"]["index_files"] == 0 \
        else "first process of this run (cache already on disk)"
    warm["kind"] = "warm cache"
    env_dir = os.environ.get("NUMBA_CACHE_DIR")
    bytecode = ("written and read (Python's default; PYTHONDONTWRITEBYTECODE, set here, is dropped for these "
                "processes)" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "written and read (Python's default)")
    return {"model": name, "batch": batch, "threads": threads, "precision": "8/8", "python_bytecode": bytecode,
            "numba_cache": {"on_disk": warm["cache_before"]["index_files"] > 0,
                            "dir": ("temporary (--fresh-cache)" if fresh_cache
                                    else (env_dir or "__pycache__ beside the sources")),
                            "fresh": fresh_cache},
            "first": first, "warm": warm,
            "bar": {"text": f"warm-cache process finishes its first {name} step within {COLD_START_BAR_S:g} s",
                    "limit_s": COLD_START_BAR_S, "warm_wall_s": warm["wall_s"],
                    "holds": warm["wall_s"] <= COLD_START_BAR_S}}


def thread_scaling(cases: list[dict], board_threads: int = BOARD_THREADS) -> list[dict]:
    """Per case and path run at several thread counts: images/s at each, the speedup from the fewest to
    the most threads, the parallel fraction p it implies (Amdahl), and p's prediction for the board."""
    by_key: dict[tuple[str, str], dict[int, float]] = {}
    labels = {}
    for c in cases:
        for path, r in c["paths"].items():
            by_key.setdefault((c["key"], path), {})[c["threads"]] = r["img_s"]
            labels[c["key"]] = c["case"]
    out = []
    for (key, path), rates in by_key.items():
        if len(rates) < 2:
            continue
        lo, hi = min(rates), max(rates)
        speedup = rates[hi] / rates[lo]
        # Amdahl with the time at `lo` threads as 1: t(hi) = (1 - p) + p * lo / hi, solved for p
        p = (1.0 - 1.0 / speedup) / (1.0 - lo / hi)
        p_clamped = min(max(p, 0.0), 1.0)
        board = 1.0 / ((1.0 - p_clamped) + p_clamped * lo / board_threads) if board_threads > lo else None
        out.append({"case": labels[key], "key": key, "path": path,
                    "img_s": {str(t): v for t, v in sorted(rates.items())},
                    "speedup": speedup, "threads": [lo, hi], "parallel_fraction": p,
                    f"predicted_speedup_{board_threads}_threads": board})
    return out


def bars(result: dict) -> list[dict]:
    """Every bar of the issue this run measured, and whether it holds."""
    out = []
    for c in result["cases"]:
        int8, fp32 = c["paths"].get("edgetrain int 8/8"), c["paths"].get("edgetrain fp32")
        torch = c["paths"].get(TORCH)
        if c["key"] in THROUGHPUT_BARS and int8 and "vs_torch" in int8:
            limit = THROUGHPUT_BARS[c["key"]]
            out.append({"bar": f"static 8/8 >= {limit:g}x PyTorch fp32", "case": c["case"], "threads": c["threads"],
                        "value": int8["vs_torch"], "limit": limit, "holds": int8["vs_torch"] >= limit})
        if int8 and torch and "peak_rss_mb" in int8 and "peak_rss_mb" in torch:
            out.append({"bar": "peak memory <= PyTorch fp32's", "case": c["case"], "threads": c["threads"],
                        "value": int8["peak_rss_mb"], "limit": torch["peak_rss_mb"],
                        "holds": int8["peak_rss_mb"] <= torch["peak_rss_mb"]})
        if c["batch"] <= 8 and int8 and "vs_torch" in int8:
            out.append({"bar": "batch 8: static 8/8 >= 1.0x PyTorch fp32", "case": c["case"], "threads": c["threads"],
                        "value": int8["vs_torch"], "limit": 1.0, "holds": int8["vs_torch"] >= 1.0})
        if int8 and fp32:
            out.append({"bar": "static 8/8 never slower than edgetrain fp32", "case": c["case"],
                        "threads": c["threads"], "value": int8["img_s"] / fp32["img_s"], "limit": 1.0,
                        "holds": int8["img_s"] >= fp32["img_s"]})
        for kind, points in (("fractrain", BAR_POINTS), ("dfq", DFQ_BAR_POINTS)):
            for fr in c.get(kind, []):
                name = "FracTrain" if kind == "fractrain" else f"DFQ {','.join(DFQ_CANDIDATES)}"
                out.append({"bar": f"{name} time% <= BitOPs% + {points:g}", "case": c["case"], "mix": fr["mix"],
                            "value": fr["time_percent_of_static"], "limit": fr["bar_limit_percent"],
                            "holds": fr["bar_holds"]})
    cs = result.get("cold_start")
    if cs:
        out.append({"bar": f"warm-cache first step <= {COLD_START_BAR_S:g} s", "case": f"{cs['model']} b{cs['batch']}",
                    "value": cs["warm"]["wall_s"], "limit": COLD_START_BAR_S, "holds": cs["bar"]["holds"]})
    return out


def cpu_description() -> dict:
    """Which CPU the figures come from: its model name, LLVM's name for it and the 8-bit dot-product features
    the integer routes can use. Ratios to PyTorch moved from 1.9x to 1.3x between two 2-core VMs (a Zen 5 and
    a 2.6 GHz Xeon), so a result without its CPU cannot be compared."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    import llvmlite.binding as llvm

    from edgetrain.kernels.routes import cpu_int8_features

    return {"cpu": model, "llvm_cpu": llvm.get_host_cpu_name(), "cpu_int8": cpu_int8_features()}


def print_table(result: dict, args) -> None:
    """The human-readable form of the result."""
    m = result["machine"]
    print(f"training step, {','.join(map(str, args.threads))} threads, {args.rounds} interleaved rounds of "
          f"{args.steps} steps on {m.get('cpu', '?')} ({m.get('llvm_cpu', '?')}; 8-bit: "
          f"{', '.join(m.get('cpu_int8', [])) or 'none'}) "
          f"(load average {m['loadavg_start'][0]:.1f} -> {m['loadavg_end'][0]:.1f})")
    if result.get("numba_compiled_during_cases"):
        print("note: Numba compiled kernels during this run (a cold or stale cache), so peak memory includes the "
              "compiler's; run again for the step's own")
    print(f"{'case':20} {'thr':>3} {'path':36} {'img/s':>8} {'step ms':>8} {'x torch':>8} {'(rounds)':>13} "
          f"{'peak MB':>8}")
    for c in result["cases"]:
        for name, r in c["paths"].items():
            ratio = f"{r['vs_torch']:8.2f} {r['vs_torch_rounds_range'][0]:6.2f}-{r['vs_torch_rounds_range'][1]:<6.2f}" \
                if "vs_torch" in r else f"{'':8} {'':13}"
            print(f"{c['case']:20} {c['threads']:3d} {name:36} {r['img_s']:8.0f} {r['step_ms']:8.1f} {ratio} "
                  f"{r['peak_rss_mb']:8.0f}")
            for op, ms in list(r.get("profile_ms", {}).items())[:8]:
                print(f"{'':18}{op:44} {ms:8.1f} ms")
    scaling = result.get("thread_scaling") or []
    if scaling:
        lo, hi = scaling[0]["threads"]
        print(f"\nthread scaling, {lo} -> {hi} threads; p = parallel fraction (Amdahl); "
              f"predicted speedup on {BOARD_THREADS} cores of this kind")
        print(f"{'case':20} {'path':36} {'speedup':>8} {'p':>6} {f'{BOARD_THREADS}-core':>8}")
        for s in scaling:
            board = s[f"predicted_speedup_{BOARD_THREADS}_threads"]
            print(f"{s['case']:20} {s['path']:36} {s['speedup']:8.2f} {s['parallel_fraction']:6.2f} "
                  f"{board if board is not None else float('nan'):8.2f}")
    for kind, title, points in (("fractrain", "FracTrain", BAR_POINTS),
                                ("dfq", f"DFQ on candidates {','.join(DFQ_CANDIDATES)} "
                                        f"(weights at {DFQ_WEIGHT_BITS} bits)", DFQ_BAR_POINTS)):
        rows = [(c["case"], fr) for c in result["cases"] for fr in c.get(kind, [])]
        if not rows:
            continue
        print(f"\n{title} against static 8/8 (bar: time% <= BitOPs% + {points:g})")
        print(f"{'case':16} {'mix':18} {'BitOPs %':>9} {'time %':>8} {'(rounds)':>13} {'limit %':>8}  bar")
        for case, fr in rows:
            lo, hi = fr["time_percent_rounds_range"] or (float("nan"), float("nan"))
            print(f"{case:16} {fr['mix']:18} {fr['bitops_percent_of_static']:9.1f} {fr['time_percent_of_static']:8.1f} "
                  f"{lo:6.1f}-{hi:<6.1f} {fr['bar_limit_percent']:8.1f}  {'holds' if fr['bar_holds'] else 'MISSED'}")
    cs = result.get("cold_start")
    if cs:
        print(f"\ncold start: new process, {cs['model']} b{cs['batch']} at 8/8, one training step "
              f"(Numba cache: {cs['numba_cache']['dir']}; Python bytecode: {cs['python_bytecode']})")
        print(f"{'process':50} {'total s':>8} {'python':>7} {'import':>7} {'build':>7} {'step':>7} {'peak MB':>8}")
        for key in ("first", "warm"):
            r = cs[key]
            print(f"{r['kind']:50} {r['wall_s']:8.2f} {r['python_start_s']:7.2f} {r['import_s']:7.2f} "
                  f"{r['build_s']:7.2f} {r['first_step_s']:7.2f} {r['peak_rss_mb']:8.0f}")
        print(f"bar: {cs['bar']['text']}: {'holds' if cs['bar']['holds'] else 'MISSED'}")


def thread_counts(text: str) -> list[int]:
    """--threads: one count or a comma-separated list of them, ascending; SystemExit (one line) on bad input."""
    try:
        counts = sorted({int(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise SystemExit(f"bench: --threads '{text}' is not a thread count or a comma-separated list of them") \
            from None
    if not counts or counts[0] < 1:
        raise SystemExit(f"bench: --threads must be at least 1, got {text}")
    return counts


def backend_paths(text: str) -> list[str]:
    """--backends: the extra int 8/8 paths, one per named route, or per usable route for 'all'."""
    names = [b.strip().lower() for b in text.split(",") if b.strip()]
    if "all" in names:
        from edgetrain.kernels.routes import usable_routes

        names = [route for route, ok in usable_routes().items() if ok]
    return [f"int8@{b}" for b in dict.fromkeys(names)]


def _parser() -> argparse.ArgumentParser:
    """The command line (see the module doc)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (default 5)")
    p.add_argument("--steps", type=int, default=3, help="steps per worker and round, at least (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per worker before the rounds (default 2)")
    p.add_argument("--threads", default="2",
                   help="threads per process, or a comma-separated list for thread scaling (default 2)")
    p.add_argument("--gap", type=float, default=0.2, help="seconds of idle between two workers' turns")
    p.add_argument("--min-turn", type=float, default=0.3, help="seconds a worker's turn lasts at least")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)} (default: all)")
    p.add_argument("--backends", default="",
                   help="also run int 8/8 on these integer routes (comma-separated), or on every usable one: all")
    p.add_argument("--mixes", nargs="*", default=list(DEFAULT_MIXES), metavar="MIX",
                   help="FracTrain mixes to run on the ResNet cases, each a candidate (3/6) or shares "
                        "(0:0.5,6/8:0.5; 0 = skip the block); candidates 0, 3/6, 4/6, 4/8, 6/8, 6/12 "
                        f"(default: {' '.join(DEFAULT_MIXES)})")
    p.add_argument("--no-fractrain", action="store_true", help="skip the FracTrain paths")
    p.add_argument("--dfq-mixes", nargs="*", default=list(DEFAULT_DFQ_MIXES), metavar="MIX",
                   help=f"DFQ mixes on the hardware's candidates {', '.join(DFQ_CANDIDATES)} (weights at "
                        f"{DFQ_WEIGHT_BITS} bits), run on the ResNet cases; none with --no-fractrain "
                        f"(default: {' '.join(DEFAULT_DFQ_MIXES)})")
    p.add_argument("--no-fp32", action="store_true", help="skip edgetrain's fp32 path")
    p.add_argument("--profile", action="store_true", help="also report per-op-type milliseconds of one step")
    p.add_argument("--no-cold-start", action="store_true", help="skip the new-process first-step timing")
    p.add_argument("--cold-start-model", default="resnet20", choices=sorted(SHAPES),
                   help="model of the cold-start process (default resnet20, as the bar says)")
    p.add_argument("--cold-start-batch", type=int, default=128, help="batch of the cold-start step (default 128)")
    p.add_argument("--fresh-cache", action="store_true",
                   help="cold start with a new, empty NUMBA_CACHE_DIR: the first process compiles every kernel")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--cold-start-child", help=argparse.SUPPRESS)
    return p


def check_args(args) -> tuple[list[str], list[str], list[str]]:
    """Validate the command line; (cases, FracTrain mix texts, DFQ mix texts). Raises SystemExit with one line
    on bad input."""
    from edgetrain.errors import EdgetrainError

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise SystemExit(f"bench: unknown case '{unknown[0] if unknown else args.cases}'; "
                         f"choose from {', '.join(CASES)}")
    for name in ("rounds", "steps", "cold_start_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"bench: --warmup must be at least 0, got {args.warmup}")
    mixes = [] if args.no_fractrain else [m.strip() for m in args.mixes]
    dfq_mixes = [] if args.no_fractrain else [m.strip() for m in args.dfq_mixes]
    from tools.bench_step import parse_mix
    try:
        for m in mixes:
            parse_mix(m)
        for m in dfq_mixes:
            parse_mix(m, DFQ_CANDIDATES)
    except EdgetrainError as e:
        raise SystemExit(f"bench: {e}") from None
    return cases, mixes, dfq_mixes


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with the hidden flags, one worker or cold-start process)."""
    args = _parser().parse_args(argv)
    args.threads = thread_counts(args.threads)
    if args.worker:
        return worker(args.worker, args.case, args.threads[-1])
    if args.cold_start_child:
        return cold_start_child(args.cold_start_child, args.cold_start_batch, args.threads[-1])
    cases, mixes, dfq_mixes = check_args(args)

    base = ["int8"] + backend_paths(args.backends)
    tail = ([] if args.no_fp32 else ["fp32"]) + ["torch"]
    result = {"threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
              "machine": {"cpus": os.cpu_count(), **cpu_description(), "platform": platform.platform(),
                          "python": platform.python_version(), "loadavg_start": os.getloadavg()},
              "cases": []}
    started = time.time()
    for c in cases:
        fractrain = [FRACTRAIN + m for m in mixes] + [DFQ + m for m in dfq_mixes] if _has_blocks(c) else []
        for threads in args.threads:
            result["cases"].append(bench_case(c, base + fractrain + tail, args, threads))
    # A worker that compiles kernels holds the compiler's memory at its peak: its peak_rss_mb is not the
    # step's (measured: ResNet-20 b128 636 MB right after an edit of a kernel module, 541 MB run again).
    cache = numba_cache_state(os.environ.get("NUMBA_CACHE_DIR"))
    result["numba_compiled_during_cases"] = cache["newest_mtime"] > started
    result["thread_scaling"] = thread_scaling(result["cases"])
    if not args.no_cold_start:
        result["cold_start"] = cold_start(args.cold_start_model, args.cold_start_batch, args.threads[-1],
                                          args.fresh_cache)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["bars"] = bars(result)
    text = json.dumps(result, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    else:
        print_table(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
