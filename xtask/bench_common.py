"""What the PyTorch benchmark counterparts share: device/dtype options, timing that waits for the
GPU, peak memory, the machine record, and the ratio against ctxalign's JSON record."""
import argparse, json, os, platform, resource, statistics, time

import torch


def parser(doc, profiling=False):
    """The shared options; `profiling` adds --profile (the training-step benchmarks take it)."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                   help="f32, or bf16 (inference: bf16 weights; training: autocast with f32 trainable weights)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--ours", help="ctxalign's JSON record of the same workload, for the ratio")
    p.add_argument("--out", help="write this run's JSON record here")
    if profiling:
        p.add_argument("--profile", help="after timing, run once more under torch.profiler and write its "
                                         "per-operator table (device time first) to this file")
    return p


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # ctxalign's f32 is true f32
        torch.backends.cudnn.allow_tf32 = False
        # The peak counter can be reset only once the device's context exists.
        torch.empty(1, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    return device, {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats):
    """Runs `fn` once to warm up, then `repeats` times; returns the per-call seconds."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def profile(fn, device, path, rows=60):
    """One more call of `fn` under torch.profiler; writes the per-operator table, sorted by device
    time (CPU time on the CPU), so a slow step can be placed kernel by kernel."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(table)
    print(f"wrote the profile to {path}")


def machine(device):
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def peak_memory(device):
    """Peak GPU memory allocated by tensors (CUDA) or peak resident memory (CPU), bytes."""
    if device.type == "cuda":
        return {"peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device),
                "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def finish(args, record, key, higher_is_better, ours_key=None):
    """Prints the ratio ctxalign / PyTorch (>1: ctxalign faster) and writes the record."""
    ours_key = ours_key or key
    if args.ours and os.path.exists(args.ours):
        ours = json.load(open(args.ours))
        if ours_key in ours:
            a, b = ours[ours_key], record[key]
            ratio = a / b if higher_is_better else b / a
            record["ctxalign"] = a
            record["speed_ratio_ctxalign_over_torch"] = ratio
            print(f"ctxalign {a:.4g} vs PyTorch {b:.4g} ({key}) -> speed ratio ctxalign/PyTorch = {ratio:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        json.dump(record, open(args.out, "w"), indent=2)
        print(f"wrote {args.out}")


median = statistics.median
