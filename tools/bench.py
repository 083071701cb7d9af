"""Training throughput and peak memory: edgetrain int 8/8 and fp32 against PyTorch fp32, interleaved.

    python tools/bench.py [--rounds 5] [--steps 3] [--warmup 2] [--threads 2] [--json] [--out FILE]
                          [--cases resnet20-b128,resnet20-b32,mlp-b128] [--backends numba] [--profile]

Every path (edgetrain's integer path at 8/8, its fp32 path, PyTorch fp32, and optionally the integer
path on other kernel backends) runs in its own worker process, set up once. The parent then runs
`--rounds` rounds; in each round every worker in turn runs `--steps` training steps or more (so
that a turn lasts `--min-turn` seconds; a rotating
order, `--gap` seconds apart so one worker's spinning OpenMP threads have gone idle before the next
starts), so a burst of load from other processes on a shared machine hits all paths alike instead
of whichever happened to run then. Reported per path: images/s from the median step time over all
rounds, the ratio to PyTorch fp32 (of the median step times; the range of the per-round ratios
shows how noisy the machine was), and the worker's resident memory after setup and at its peak
(ru_maxrss: imports, model, and the largest step's activations and scratch).

GOP counts are not reported here; `tools/bench_kernels.py` times the kernels alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = {  # key: (label, builder name, batch, input shape per sample)
    "resnet20-b128": ("ResNet-20 b128", "resnet20", 128, (3, 32, 32)),
    "resnet20-b32": ("ResNet-20 b32", "resnet20", 32, (3, 32, 32)),
    "mlp-b128": ("MLP b128", "mlp", 128, (784,)),
}
TORCH = "torch fp32"
PREFIX = "@@bench "  # worker replies are the stdout lines that start with this


def _label(path: str) -> str:
    """Path key -> display name: int8, int8@numba, fp32, torch."""
    if path == "torch":
        return TORCH
    if path == "fp32":
        return "edgetrain fp32"
    backend = path.partition("@")[2]
    return "edgetrain int 8/8" + (f" [{backend}]" if backend else "")


# ------------------------------------------------------------------------------------- worker


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(path: str, case: str, threads: int) -> int:
    """Set one path up, then answer commands on stdin: run n steps, profile, quit."""
    _, name, batch, shape = CASES[case]
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    kernel_backend = None
    model = None
    if path == "torch":
        import torch

        torch.set_num_threads(threads)
        from bench_step import make_torch_step
        step = make_torch_step(name, batch, shape)
    else:
        import numba
        from threadpoolctl import threadpool_limits

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _limits = threadpool_limits(threads)  # kept for the worker's lifetime
        from edgetrain import kernels
        precision, _, backend = path.partition("@")
        if backend:
            kernels.set_backend(backend)
        kernel_backend = kernels.get_backend().name
        from bench_step import make_edgetrain_step
        step, model = make_edgetrain_step(name, batch, shape, "8/8" if precision == "int8" else "fp32")
    setup_mb = _rss_mb()

    def reply(**kw):
        sys.stdout.write(PREFIX + json.dumps(kw) + "\n")
        sys.stdout.flush()

    reply(ready=True, backend=kernel_backend, setup_rss_mb=setup_mb)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            times = []
            for _ in range(cmd["n"]):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            reply(times=times)
        elif cmd["cmd"] == "profile":
            reply(profile=_profile(step, model))
        elif cmd["cmd"] == "quit":
            reply(peak_rss_mb=_peak_mb())
            return 0
    return 0


def _profile(step, model) -> dict:
    """Milliseconds per op type and direction over one step (the executor's own timings)."""
    if model is None:
        return {}
    model.executor.timings = {}
    step()
    out: dict[str, float] = {}
    for (node, direction), seconds in model.executor.timings.items():
        key = f"{type(model.executor.ops[node]).__name__}.{direction}"
        out[key] = out.get(key, 0.0) + 1e3 * seconds
    model.executor.timings = None
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# ------------------------------------------------------------------------------------- parent


class Worker:
    def __init__(self, path: str, case: str, threads: int, env: dict | None = None):
        self.path = path
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", path, "--case", case, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        self.info = self.read()

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"worker {self.path} exited with {self.proc.wait()}")

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.read()


def bench_case(case: str, paths: list[str], args) -> dict:
    label, _, batch, _ = CASES[case]
    workers = [Worker(p, case, args.threads) for p in paths]
    times: dict[str, list[float]] = {w.path: [] for w in workers}
    rounds: dict[str, list[float]] = {w.path: [] for w in workers}
    try:
        steps = {}
        for w in workers:
            warm = w.ask(cmd="run", n=args.warmup)["times"]
            # short steps (the MLP's take milliseconds) run more per turn, so a turn lasts about
            # --min-turn seconds and the first step after the gap does not dominate its median
            steps[w.path] = max(args.steps, int(args.min_turn / max(min(warm), 1e-6)))
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
    out = {"case": label, "batch": batch, "paths": {}}
    for w in workers:
        med = statistics.median(times[w.path])
        row = {"step_ms": 1e3 * med, "img_s": batch / med, "steps": len(times[w.path]),
               "setup_rss_mb": w.info["setup_rss_mb"], "peak_rss_mb": peaks[w.path]}
        if w.info.get("backend"):
            row["kernel_backend"] = w.info["backend"]
        if ref is not None and w.path != "torch":
            # images/s relative to torch: torch's median step time over this path's; and per
            # round (the two turns were seconds apart), whose spread shows how noisy the machine was
            per_round = [a / b for a, b in zip(rounds["torch"], rounds[w.path])]
            row["vs_torch"] = ref / med
            row["vs_torch_rounds_median"] = statistics.median(per_round)
            row["vs_torch_rounds_range"] = [min(per_round), max(per_round)]
        if w.path in profiles:
            row["profile_ms"] = profiles[w.path]
        out["paths"][_label(w.path)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per worker and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.2, help="seconds of idle between two workers' turns")
    p.add_argument("--min-turn", type=float, default=0.3, help="seconds a worker's turn lasts at least")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--backends", default="", help="also run int 8/8 on these kernel backends (e.g. numba)")
    p.add_argument("--no-fp32", action="store_true", help="skip edgetrain's fp32 path")
    p.add_argument("--profile", action="store_true", help="also report per-op-type milliseconds of one step")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.case, args.threads)

    paths = ["int8"] + [f"int8@{b}" for b in args.backends.split(",") if b] + ([] if args.no_fp32 else ["fp32"])
    paths.append("torch")
    result = {"threads": args.threads, "rounds": args.rounds, "steps_per_round": args.steps,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "loadavg_start": os.getloadavg()},
              "cases": [bench_case(c, paths, args) for c in args.cases.split(",") if c]}
    result["machine"]["loadavg_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
        return 0
    print(f"training step, {args.threads} threads, {args.rounds} interleaved rounds of {args.steps} steps "
          f"(load average {result['machine']['loadavg_start'][0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f})")
    print(f"{'case':16} {'path':30} {'img/s':>8} {'step ms':>8} {'x torch':>8} {'(rounds)':>13} {'peak MB':>8}")
    for c in result["cases"]:
        for name, r in c["paths"].items():
            ratio = f"{r['vs_torch']:8.2f} {r['vs_torch_rounds_range'][0]:6.2f}-{r['vs_torch_rounds_range'][1]:<6.2f}" \
                if "vs_torch" in r else f"{'':8} {'':13}"
            print(f"{c['case']:16} {name:30} {r['img_s']:8.0f} {r['step_ms']:8.1f} {ratio} {r['peak_rss_mb']:8.0f}")
            for op, ms in list(r.get("profile_ms", {}).items())[:8]:
                print(f"{'':18}{op:38} {ms:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
