"""Benchmark stage 2's outer loop against its arithmetic floor, and its peak memory.

    python bench/bench_stage2.py --arch resnet18 --image_size 32 --bs 150 --adaptation_steps 10
    python bench/bench_stage2.py --project backdoor --arch resnet50
    python bench/bench_stage2.py --fts_envs 2 --world_sizes 1,2        # torchrun scaling, per-rank s/loop

Seconds per outer loop of the real stage-2 algorithm (common.sophon.Sophon.step, as algo.py/bd_algo.py
run it), the floor measured in the same process (the same number of plain forward/backward passes and
optimiser steps on one model: adaptation_steps x (support + query) + ntr_loop x NTR), their ratio, and
peak memory at two values of --adaptation_steps (each in a fresh process; it must not grow). Data is
synthetic and in memory, so neither disk nor decoding is measured. Prints a table, writes JSON.

How far from the hardware: images/s, the FLOPs of one outer loop (torch.utils.flop_counter.FlopCounterMode,
counted on one eager loop: convolutions and matmuls, forward and backward), the achieved TFLOP/s, the
device's name and the projected time of an 800-loop run (loops only: no evaluation, probes or checkpoints).
--profile prints the top-15 operators by self time (device time on CUDA, CPU time on CPU) over two loops.
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from common import dist
from common.backdoor import poison, target_query_loss
from common.data import DATA_ON_DEVICE, Domain
from common.fts import support_query_split
from common.losses import FTE_LOSSES, fte_query_loss
from common.models import build_model
from common.sophon import Sophon
from common.stage2 import Stage2Settings
from common.train import Precision, make_optimizer

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--project", choices=("sophon", "backdoor"), default="sophon")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--bs", type=int, default=150)
    p.add_argument("--adaptation_steps", type=int, default=10)
    p.add_argument("--memory_steps", default="5,20",
                   help="two adaptation_steps values for the memory check; none: skip it (saves two process starts)")
    p.add_argument("--loops", type=int, default=5, help="timed outer loops (after one warm-up)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "off"), default="auto")
    p.add_argument("--channels_last", action="store_true", help="CUDA only; not applied with --compile")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the learner's and the model's forward (and backward), also on CPU here; the "
                        "first loop's time (compilation included) is reported apart")
    p.add_argument("--data_on_device", choices=DATA_ON_DEVICE, default="auto",
                   help="training data on the device (auto: on CUDA when it takes a modest share of free memory)")
    p.add_argument("--profile", action="store_true", help="print the top-15 operators by self time over two loops")
    p.add_argument("--projected_loops", type=int, default=800, help="loops of the projected run time")
    p.add_argument("--fts_optimizers", default="sgd")
    p.add_argument("--fts_envs", type=int, default=1, help="simulated fine-tuners per FTS step (dealt to the ranks)")
    p.add_argument("--world_sizes", default=None,
                   help="e.g. 1,2: run the loop under torchrun with each number of ranks (this machine) and report "
                        "per-rank seconds per loop and the scaling efficiency against one process")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/<name>.json)")
    p.add_argument("--_memory_child", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def synthetic_domain(name, n, size, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return Domain(name, True, images, labels, n)


def build(args, adaptation_steps):
    device = dist.world().device(args.device)
    precision = Precision(device, args.amp, args.channels_last, "always" if args.compile else False)
    model = precision.prepare(build_model(args.arch, 10, "scratch"))
    n = max(4 * args.bs, 600)
    orig = synthetic_domain("FashionMNIST", n, args.image_size, 1, 0)
    restricted = synthetic_domain("MNIST", n, args.image_size, 1, 1)
    orig, restricted = orig.pin_for(device), restricted.pin_for(device)
    config = Stage2Settings(bs=args.bs, adaptation_steps=adaptation_steps, fts_envs=args.fts_envs,
                            fts_optimizers=tuple(args.fts_optimizers.split(",")))
    if args.project == "sophon":
        query = fte_query_loss(FTE_LOSSES["kl"], restricted, device, precision.channels_last)
        ntr = orig
    else:
        config = replace(config, fts_head=("keep",))
        query = target_query_loss(restricted, 3, 0, device, precision.channels_last)
        ntr, _ = poison(orig, 0.1, 0, 3)
    return Sophon(model, query, restricted, ntr, config, precision, data_on_device=args.data_on_device), device, precision


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_outer(algo, device, loops):
    """(seconds of the first loop: warm-up, allocator, cudnn autotune, compilation; mean seconds per loop after)."""
    start = time.perf_counter()
    algo.step()
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(loops):
        algo.step()
    sync(device)
    return first, (time.perf_counter() - start) / loops


def time_floor(algo, args, device, precision, loops):
    """The same passes without FTS bookkeeping: one model (the learner, compiled when the loop's is), the
    loop's SGD, the same batch shapes and the same data path (the loop's gather, one index copy per loop)."""
    model, forward = algo.fts.learner, algo.fts.learner_fwd
    opt = make_optimizer("sgd", model.parameters(), 1e-4, device=device)
    domain, gather = algo.restricted, algo.restricted_gather
    gen = torch.Generator().manual_seed(0)

    def step(x, y):
        with precision.autocast():
            loss = F.cross_entropy(forward(domain.to_input(x, device, None, precision.channels_last)).float(),
                                   y.to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def one_loop():
        rows = []
        for _ in range(args.adaptation_steps):
            idx = torch.randint(0, len(domain), (args.bs,), generator=gen)
            support, query = support_query_split(args.bs, gen)
            rows.append(idx[torch.cat([support, query])])
        cut = len(support)
        rows.append(torch.randint(0, len(domain), (args.bs,), generator=gen))
        rows = gather.indices(torch.stack(rows))
        for row in rows[:-1]:
            x, y = gather(row)
            step(x[:cut], y[:cut])
            step(x[cut:], y[cut:])
        step(*gather(rows[-1]))

    model.train()
    one_loop()
    sync(device)
    start = time.perf_counter()
    for _ in range(loops):
        one_loop()
    sync(device)
    return (time.perf_counter() - start) / loops


@contextlib.contextmanager
def eager(algo):
    """The loop with its compiled forwards swapped for the plain modules (FLOP counting)."""
    parts = (algo.ntr, algo.clean, algo.neurotoxin)  # they share the model's compiled forward
    saved = algo.fts.learner_fwd, [part.model_fwd for part in parts]
    algo.fts.learner_fwd = algo.fts.learner
    for part in parts:
        part.model_fwd = algo.model
    try:
        yield algo
    finally:
        algo.fts.learner_fwd = saved[0]
        for part, fwd in zip(parts, saved[1]):
            part.model_fwd = fwd


def flops_per_loop(algo):
    """FLOPs of one outer loop (convolutions, matmuls; forward and backward), counted on an eager loop."""
    from torch.utils.flop_counter import FlopCounterMode
    with eager(algo), FlopCounterMode(display=False) as counter:
        algo.step()
    return counter.get_total_flops()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def profile(algo, device, loops=2, rows=15):
    """Top operators by self time over `loops` outer loops (device time on CUDA, CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(loops):
            algo.step()
        sync(device)
    averages = prof.key_averages()
    key = "self_cpu_time_total"
    if cuda:
        key = "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
    print(f"top {rows} operators by {key} over {loops} loops:")
    print(averages.table(sort_by=key, row_limit=rows))


def peak_memory_mb(args, steps):
    """Peak memory of a fresh process running two outer loops at `steps` inner steps."""
    cmd = [sys.executable, __file__, "--_memory_child", str(steps)] + [
        a for a in sys.argv[1:] if not a.startswith("--_memory_child")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_child(args):
    algo, device, _ = build(args, args._memory_child)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        algo.step()
    sync(device)
    if device.type == "cuda":
        peak = {"device": "cuda", "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    else:
        peak = {"device": "cpu", "peak_mb": peak_rss_mb()}
    print(json.dumps(peak))


def peak_rss_mb():
    """This process's peak resident memory. Linux's VmHWM, not ru_maxrss: ru_maxrss survives execve, so a child
    started by a large parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_timing(args):
    """Under torchrun: every rank times the same loops; rank 0 writes {world_size, per-rank s/loop}."""
    world = dist.init_from_env(args.device)
    algo, device, _ = build(args, args.adaptation_steps)
    per_rank = world.gather(time_outer(algo, device, args.loops)[1])
    if world.main:
        args.out.write_text(json.dumps({"world_size": world.size, "seconds_per_loop": per_rank,
                                        "threads_per_rank": torch.get_num_threads()}))
    dist.shutdown()


def _without(argv, *flags):
    """argv less the given flags and their values (`--flag V` or `--flag=V`)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out


def scaling(args, argv):
    """The loop under torchrun at each world size; efficiency = t(1) / (N * t(N)) for the same fts_envs."""
    sizes = [int(n) for n in args.world_sizes.split(",")]
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rank_timing.json"
            child = _without(argv, "--world_sizes", "--out")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   __file__, *child, "--out", str(out)]
            subprocess.run(cmd, check=True, env={**os.environ, "SOPHON_BENCH_RANK_TIMING": "1"})
            rows.append(json.loads(out.read_text()))
    base = max(rows[0]["seconds_per_loop"])
    print(f"{'ranks':>5} {'fts_envs':>8} {'threads/rank':>12} {'s/loop per rank':>28} {'efficiency':>10}")
    for row in rows:
        n, slowest = row["world_size"], max(row["seconds_per_loop"])
        row["efficiency_vs_1"] = base / (n * slowest) * sizes[0]
        times = " ".join(f"{t:.3f}" for t in row["seconds_per_loop"])
        print(f"{n:>5} {args.fts_envs:>8} {row['threads_per_rank']:>12} {times:>28} {row['efficiency_vs_1']:>10.2f}")
    out = args.out or RESULTS / f"scaling_{args.arch}_{args.image_size}px_envs{args.fts_envs}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"fts_envs": args.fts_envs, "arch": args.arch, "rows": rows}, indent=2) + "\n")
    print(f"written {out}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if os.environ.get("SOPHON_BENCH_RANK_TIMING"):
        return rank_timing(args)
    if args.world_sizes:
        return scaling(args, argv)
    if args._memory_child is not None:
        return memory_child(args)
    algo, device, precision = build(args, args.adaptation_steps)
    first_s, loop_s = time_outer(algo, device, args.loops)
    if args.profile:
        profile(algo, device)
    flops = flops_per_loop(algo)
    floor_s = time_floor(algo, args, device, precision, args.loops)
    steps = [] if args.memory_steps == "none" else [int(s) for s in args.memory_steps.split(",")]
    memory = {s: peak_memory_mb(args, s)["peak_mb"] for s in steps}
    name = f"{args.project}_{args.arch}_{args.image_size}px_bs{args.bs}_steps{args.adaptation_steps}_{device.type}"
    name += "_compile" * precision.compile + "_devdata" * algo.data_on_device
    images_per_s = (args.adaptation_steps + 1) * args.bs / loop_s
    tflops = flops / loop_s / 1e12
    projected_min = args.projected_loops * loop_s / 60
    result = {"name": name, "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
              "precision": precision.describe(), "arch": args.arch, "image_size": args.image_size, "bs": args.bs,
              "adaptation_steps": args.adaptation_steps, "fts_optimizers": args.fts_optimizers,
              "compile": precision.compile, "data_on_device": algo.data_on_device,
              "seconds_per_loop": loop_s, "floor_seconds_per_loop": floor_s, "ratio": loop_s / floor_s,
              "first_loop_seconds": first_s, "images_per_second": images_per_s,
              "flops_per_loop": flops, "gflop_per_loop": flops / 1e9, "achieved_tflops": tflops,
              f"projected_{args.projected_loops}_loops_minutes": projected_min,
              "peak_memory_mb": {str(k): v for k, v in memory.items()},
              "torch": torch.__version__}
    print(f"device: {result['device_name']} ({device}); {precision.describe()}; torch {torch.__version__}")
    print(f"{'setting':<52} {'s/loop':>8} {'floor':>8} {'ratio':>6} " + " ".join(f"{'mem@' + str(s):>10}" for s in steps)
          + f" {'img/s':>8} {'GFLOP':>8} {'TFLOP/s':>8} {f'{args.projected_loops}-loop min':>14} {'1st loop s':>10}"
          f" {'compile':>7} {'data_on_dev':>11}")
    print(f"{name:<52} {loop_s:8.3f} {floor_s:8.3f} {loop_s / floor_s:6.2f} " +
          " ".join(f"{memory[s]:9.0f}M" for s in steps) +
          f" {images_per_s:8.0f} {flops / 1e9:8.1f} {tflops:8.3f} {projected_min:14.1f} {first_s:10.2f}"
          f" {str(precision.compile):>7} {str(algo.data_on_device):>11}")
    out = args.out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
