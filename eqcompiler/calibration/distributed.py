"""Distributed calibration with torch.distributed: shard windows across ranks, merge statistics exactly.

Rank r of N observes windows r, r+N, r+2N, ...; afterwards the per-tensor statistics are merged with
collectives (all_reduce MIN/MAX for ranges, SUM for counts, histograms, abssum and Gram matrices),
and rank 0 writes the file (staged: temp file + rename, so a failure writes nothing).

Min/max, counts and histograms merge bit-identically to a single-process run (histogram ranges are
powers of two, see eqcompiler/calibration/observers.py); float sums (abssum in float64, gram in
float32, reduced in float64) agree to rounding (~1e-15 and ~1e-7 relative).

Two ways to run it:
- `eqc calibrate --workers N` (launch_local): spawns N local processes of
  `python -m eqcompiler.calibration.distributed_calibrate`, rendezvous on a free localhost port, and watches
  them: if one dies, the others are stopped at once and the command fails naming the rank.
- `torchrun --nproc-per-node N [--nnodes ... --rdzv-endpoint ...] -m eqcompiler.calibration.distributed_calibrate MODEL ...`:
  the module reads the usual RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR /
  MASTER_PORT variables; torchrun stops the surviving ranks when one fails.

Backend: gloo on CPU, nccl when CUDA is available (EQC_DIST_BACKEND overrides). Collectives time
out after EQC_DIST_TIMEOUT seconds (default 1800: ranks that finish early wait for the slowest one;
a dead peer on the same network is noticed immediately because its sockets close).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import numpy as np

from eqcompiler.errors import EqcError
from eqcompiler.calibration.stats import TensorStats

_PACK_LIMIT = 1 << 20  # arrays larger than this are reduced on their own instead of packed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def threads_per_rank(local_world: int) -> int:
    return max(1, cores() // max(1, local_world))


def init_process_group() -> tuple[int, int, Any]:
    """Join the group described by the torchrun environment; returns (rank, world_size, device)."""
    import torch
    import torch.distributed as dist

    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise EqcError(f"distributed calibration needs {', '.join(missing)} in the environment "
                       "(run it with torchrun or `eqc calibrate --workers N`)")
    backend = os.environ.get("EQC_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=float(os.environ.get("EQC_DIST_TIMEOUT", "1800")))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=timeout)
    except Exception as exc:
        raise EqcError(f"cannot join the process group ({backend}): {_first_line(exc)}") from None
    return dist.get_rank(), dist.get_world_size(), device


def shard(n_windows: int, rank: int, world: int) -> list[int]:
    """Windows of one rank: r, r+N, r+2N, ..."""
    return list(range(rank, n_windows, world))


def check_same_inputs(identity: dict[str, Any], rank: int, world: int) -> None:
    """Every rank's model fingerprint, text digest and window options, gathered and compared with rank 0's
    before any window runs: a mismatch is refused on every rank, naming the rank that differs (exit 2)."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, dict(identity))
    what = {"model_fingerprint": "another model (fingerprint {mine}, rank 0: {ref})",
            "data_sha256": "another calibration text (sha256 {mine}, rank 0: {ref})"}
    for other, theirs in enumerate(gathered):
        if other == 0 or theirs == gathered[0]:
            continue
        for key in [*what, *sorted(set(theirs) | set(gathered[0]))]:
            mine, ref = theirs.get(key), gathered[0].get(key)
            if mine != ref:
                detail = what[key].format(mine=str(mine)[:16], ref=str(ref)[:16]) if key in what else \
                    f"other options ({key} {mine!r}, rank 0: {ref!r})"
                raise EqcError(f"rank {other} of {world} calibrates {detail}; every rank must calibrate the same "
                               "model on the same text with the same options, nothing was merged")


def _layout(stats: dict[str, TensorStats]) -> list[tuple[str, str, tuple[int, ...]]]:
    """What every rank must agree on before packing: names, statistic keys and shapes."""
    out = []
    for name in sorted(stats):
        t = stats[name]
        if t.absmax_channel is not None:
            out.append((name, "absmax_channel", tuple(t.absmax_channel.shape)))
        out += [(name, k, tuple(np.shape(v))) for k, v in sorted(t.extra.items())]
    return out


def _reduce_list(arrays: list[np.ndarray], op: Any, dtype: Any, device: Any) -> list[np.ndarray]:
    """all_reduce a list of arrays (cast to `dtype`), packing the small ones into one buffer."""
    import torch
    import torch.distributed as dist

    def reduce(flat: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(flat)).to(device)
        dist.all_reduce(t, op=op)
        return t.cpu().numpy()

    result: list[np.ndarray | None] = [None] * len(arrays)
    small = [i for i, a in enumerate(arrays) if np.size(a) <= _PACK_LIMIT]
    for i, a in enumerate(arrays):
        if i not in small:
            result[i] = reduce(np.asarray(a, dtype=dtype).ravel()).reshape(np.shape(a))
    if small:
        flat = np.concatenate([np.asarray(arrays[i], dtype=dtype).ravel() for i in small])
        merged = reduce(flat)
        offset = 0
        for i in small:
            n = int(np.size(arrays[i]))
            result[i] = merged[offset:offset + n].reshape(np.shape(arrays[i]))
            offset += n
    return result  # type: ignore[return-value]


def merge_stats(stats: dict[str, TensorStats], device: Any = "cpu") -> None:
    """Merge every rank's statistics in place (all ranks end with the merged result)."""
    import torch.distributed as dist
    from torch.distributed import ReduceOp

    from eqcompiler.calibration.observers import rebin

    names = sorted(stats)
    digest = int.from_bytes(hashlib.sha256(json.dumps(_layout(stats)).encode()).digest()[:7], "big")
    lo_hi = _reduce_list([np.array([digest]), np.array([-digest])], ReduceOp.MAX, np.int64, device)
    if int(lo_hi[0][0]) != digest or int(-lo_hi[1][0]) != digest:
        raise EqcError("ranks observed different tensors or shapes; they must calibrate the same model with the same options")

    # Phase 1: ranges (exact: float32 values are exact in float64) and histogram ranges.
    mins = [np.array([stats[n].min]) for n in names] + [stats[n].extra["kv_min_channel"]
                                                         for n in names if "kv_min_channel" in stats[n].extra]
    maxs = ([np.array([stats[n].max]) for n in names]
            + [stats[n].absmax_channel for n in names if stats[n].absmax_channel is not None]
            + [stats[n].extra["kv_max_channel"] for n in names if "kv_max_channel" in stats[n].extra]
            + [stats[n].extra["hist_max"] for n in names if "hist_max" in stats[n].extra])
    mins = _reduce_list(mins, ReduceOp.MIN, np.float64, device)
    maxs = _reduce_list(maxs, ReduceOp.MAX, np.float64, device)
    it_min, it_max = iter(mins), iter(maxs)
    for n in names:
        stats[n].min = float(next(it_min)[0])
    for n in names:
        stats[n].max = float(next(it_max)[0])
    for n in names:
        if stats[n].absmax_channel is not None:
            stats[n].absmax_channel = next(it_max).astype(np.float32)
    for n in names:
        if "kv_min_channel" in stats[n].extra:
            stats[n].extra["kv_min_channel"] = next(it_min).astype(np.float32)
    for n in names:
        if "kv_max_channel" in stats[n].extra:
            stats[n].extra["kv_max_channel"] = next(it_max).astype(np.float32)
    for n in names:
        extra = stats[n].extra
        if "hist_max" in extra:
            top = float(next(it_max).reshape(()))
            extra["hist"] = rebin(extra["hist"], float(extra["hist_max"]), top)
            extra["hist_max"] = np.array(top, dtype=np.float64)

    # Phase 2: sums. Integer counts are exact; float sums agree to rounding.
    int_keys = ("hist", "gram_rows")
    ints = [np.array([stats[n].count]) for n in names] + [stats[n].extra[k] for n in names for k in int_keys
                                                          if k in stats[n].extra]
    float_keys = ("abssum_channel", "gram")
    floats = [stats[n].extra[k] for n in names for k in float_keys if k in stats[n].extra]
    ints = _reduce_list(ints, ReduceOp.SUM, np.int64, device)
    it_int = iter(ints)
    for n in names:
        stats[n].count = int(next(it_int)[0])
    for n in names:
        for k in int_keys:
            if k in stats[n].extra:
                stats[n].extra[k] = next(it_int).astype(np.int64).reshape(np.shape(stats[n].extra[k]))
    if floats:
        it_f = iter(_reduce_list(floats, ReduceOp.SUM, np.float64, device))
        for n in names:
            for k in float_keys:
                if k in stats[n].extra:  # summed in float64, kept in the observer's own dtype (gram: float32)
                    stats[n].extra[k] = next(it_f).astype(stats[n].extra[k].dtype)
    dist.barrier()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error_line(path: pathlib.Path | None) -> str:
    if path is None or not path.is_file():
        return ""
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1]


def launch_local(workers: int, rank_args: Sequence[str], summary: bool = True,
                 threads: int | None = None, poll_s: float = 0.1, grace_s: float = 5.0) -> dict[str, Any]:
    """Run `python -m eqcompiler.calibration.distributed_calibrate RANK_ARGS` as `workers` local ranks and watch them.

    Returns rank 0's JSON summary. If any rank fails, the others are stopped (terminate, then kill
    after `grace_s`) and an EqcError names the rank and its last error line; nothing is written.
    """
    if workers < 1:
        raise EqcError(f"--workers must be at least 1, got {workers}")
    per_rank = threads or threads_per_rank(workers)
    port = free_port()
    tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="eqc-calib-"))
    summary_path = tmpdir / "summary.json"
    procs: list[subprocess.Popen] = []
    logs: list[pathlib.Path | None] = []
    try:
        for rank in range(workers):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(workers), LOCAL_RANK=str(rank),
                       LOCAL_WORLD_SIZE=str(workers), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       EQC_THREADS=str(per_rank), OMP_NUM_THREADS=str(per_rank), OPENBLAS_NUM_THREADS=str(per_rank),
                       MKL_NUM_THREADS=str(per_rank), EQC_CALIB_SUMMARY=str(summary_path))
            cmd = [sys.executable, "-m", "eqcompiler.calibration.distributed_calibrate", *rank_args, "--threads", str(per_rank)]
            if rank == 0:  # rank 0 shows the progress bar on our stderr
                log = None
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
            else:
                log = tmpdir / f"rank{rank}.log"
                with open(log, "wb") as fh:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=fh))
            logs.append(log)
        failed = _watch(procs)
        if failed is not None:
            rank, code = failed
            _stop(procs, grace_s)
            detail = _last_error_line(logs[rank])
            raise EqcError(f"calibration rank {rank} of {workers} {_describe_exit(code)}"
                           + (f" ({detail.removeprefix('error: ')})" if detail else "")
                           + "; the other ranks were stopped and no statistics file was written",
                           exit_code=code if 2 <= code <= 4 else 1)
        if not summary_path.is_file():
            raise EqcError("calibration ranks finished but rank 0 wrote no summary")
        return json.loads(summary_path.read_text())
    except BaseException:
        _stop(procs, grace_s)
        raise
    finally:
        for p in tmpdir.iterdir() if tmpdir.exists() else []:
            p.unlink(missing_ok=True)
        tmpdir.rmdir() if tmpdir.exists() else None


def _watch(procs: list[subprocess.Popen], poll_s: float = 0.1) -> tuple[int, int] | None:
    """Wait for all ranks; return (rank, exit code) of the first one that fails, or None.

    A rank whose peer died fails too, a moment later, with exit code 1 (gloo's read error): when one sweep
    finds several failed ranks, the one that failed otherwise is the cause and is the one named."""
    while True:
        running = False
        failed: list[tuple[int, int]] = []
        for rank, p in enumerate(procs):
            code = p.poll()
            if code is None:
                running = True
            elif code != 0:
                failed.append((rank, code))
        if failed:
            return min(failed, key=lambda rank_code: (rank_code[1] == 1, rank_code[0]))
        if not running:
            return None
        time.sleep(poll_s)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
