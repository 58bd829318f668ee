"""One rank of a distributed calibration run (see eqcompiler/calibration/distributed.py).

    torchrun --nproc-per-node 2 -m eqcompiler.calibration.distributed_calibrate MODEL --data valid.txt -o stats.npz
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m eqcompiler.calibration.distributed_calibrate MODEL --data valid.txt -o stats.npz

Every rank takes windows rank, rank+N, ...; statistics are merged with collectives and rank 0
writes the file. `eqc calibrate --workers N` launches this module N times on one machine.
Before any window runs, the ranks exchange the model fingerprint, the text's sha256 and the window
options, and refuse a mismatch naming the rank that differs.
Test hook: EQC_TEST_KILL_RANK=R makes rank R exit abruptly (os._exit) before its second window.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import click

from eqcompiler.errors import EqcError


def run_rank(model: str, text: str, samples: int, seq_len: int, out: pathlib.Path, overwrite: bool,
             skip_nonfinite: bool, observers: str, decode_steps: int, threads: int | None,
             stream_layers: bool = False, tokenizer: str | None = None) -> dict | None:
    """Calibrate this rank's shard, merge with the others; rank 0 writes `out` and returns the summary."""
    import torch
    import torch.distributed as dist

    from eqcompiler.calibration.calibrate import Calibrator, tqdm_progress
    from eqcompiler.calibration.distributed import (check_same_inputs, init_process_group, merge_stats, shard,
                                                    threads_per_rank)
    from eqcompiler.calibration.stats import CalibrationStats

    start = time.perf_counter()
    rank, world, device = init_process_group()
    finished = False
    try:
        if rank == 0 and out.exists() and not overwrite:
            raise EqcError(f"statistics file '{out}' exists; pass --overwrite to replace it")
        threads = threads or threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(threads)
        cal = Calibrator(model, text, samples, seq_len, observers=observers, decode_steps=decode_steps,
                         skip_nonfinite=skip_nonfinite, threads=threads, stream_layers=stream_layers, tokenizer=tokenizer)
        identity = {"model_fingerprint": cal.fingerprint, "data_sha256": cal.text_sha, "windows": cal.n_windows,
                    "seq_len": seq_len, "decode_steps": decode_steps, "observers": list(cal.observers),
                    "stream_layers": bool(cal.stream_layers), "skip_nonfinite": skip_nonfinite}
        # Checked before any collective: every rank raises it at once, none is left waiting in a gather.
        if cal.n_windows < world:
            raise EqcError(f"{cal.n_windows} windows cannot be shared by {world} ranks; use more --samples or fewer workers")
        check_same_inputs(identity, rank, world)  # before any window runs, so nothing is merged from strangers
        mine = shard(cal.n_windows, rank, world)
        kill_rank = os.environ.get("EQC_TEST_KILL_RANK")

        def on_window(index: int) -> None:
            if kill_rank is not None and int(kill_rank) == rank and index != mine[0]:
                os._exit(17)  # test hook: die like a killed process, mid-run, without cleanup

        progress, close = tqdm_progress(f"calibrate (rank 0 of {world})", enabled=rank == 0)
        try:
            stats = cal.run(mine, progress=progress, on_window=on_window)
        finally:
            close()
        rows = _pop_samples(stats)  # rank-dependent row counts: merged on rank 0, not by all_reduce
        merge_stats(stats, device)
        if "sample" in cal.observers:
            _gather_samples(stats, rows, rank, world)
        if rank != 0:
            finished = True
            return None
        result = CalibrationStats(meta=cal.meta(cal.n_windows), tensors=stats)
        result.save(out, overwrite=overwrite)
        finished = True
        # How many ranks and how long: facts about the run, in the summary, not in the file (whose bytes
        # then depend only on the model, the data and the options).
        return {"output": str(out), "tensors": len(stats), **result.meta, "workers": world,
                "threads_per_worker": threads, "seconds": round(time.perf_counter() - start, 2)}
    finally:
        # Leave together: no rank tears its connections down while another still holds them. A rank that
        # failed does not tear down at all (a peer may still be in a collective with it): main() ends it with
        # os._exit, since gloo's threads destroyed mid-connection abort the process ("terminate called without
        # an active exception", exit -6) instead of letting it exit with its error's code.
        if finished and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _pop_samples(stats: dict) -> dict:
    """Take the 'sample' observer's rows out of every tensor's extra (name -> {key: array})."""
    return {name: {k: t.extra.pop(k) for k in ("sample_keys", "sample_rows")}
            for name, t in stats.items() if "sample_keys" in t.extra}


def _gather_samples(stats: dict, samples: dict, rank: int, world: int) -> None:
    """Rank 0 merges every rank's bottom-k samples (exact: union, keep the smallest keys)."""
    import torch.distributed as dist

    from eqcompiler.calibration.observers import merge_extra

    gathered: list | None = [None] * world if rank == 0 else None
    dist.gather_object(samples, gathered, dst=0)
    if rank == 0:
        for other in gathered:
            for name, extra in other.items():
                merge_extra(stats[name].extra, extra)


def _exit_now(message: str, code: int) -> None:
    """A failed rank says why and exits with `code` without tearing down its process group (see run_rank):
    what it wrote is complete or was never renamed into place (atomic writes), so nothing is lost."""
    click.echo(message, err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("--data", "text", required=True, help="UTF-8 text file (calibration split).")
@click.option("--samples", default=32, show_default=True, help="Number of windows (all ranks together).")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per window.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=pathlib.Path), help="Statistics file (.npz).")
@click.option("--overwrite", is_flag=True, help="Replace an existing statistics file.")
@click.option("--skip-nonfinite", is_flag=True, help="Treat NaN/Inf activations as 0 instead of failing.")
@click.option("--observers", default="minmax,absmax_channel,abssum", show_default=True, help="See `eqc calibrate --help`.")
@click.option("--decode-steps", default=0, show_default=True, help="Decode steps after each prefill window.")
@click.option("--threads", default=None, type=int, help="Intra-op threads per rank (default: cores // local ranks).")
@click.option("--stream-layers", is_flag=True, help="Each rank runs its windows one decoder layer at a time.")
@click.option("--tokenizer", default=None, help="See `eqc calibrate --help`.")
@click.option("--json", "as_json", is_flag=True, help="Rank 0 prints the summary as JSON.")
def main(model: str, text: str, samples: int, seq_len: int, out: pathlib.Path, overwrite: bool, skip_nonfinite: bool,
         observers: str, decode_steps: int, threads: int | None, stream_layers: bool, tokenizer: str | None,
         as_json: bool) -> None:
    """Calibrate MODEL as one rank of a torch.distributed group (torchrun or `eqc calibrate --workers`)."""
    rank = os.environ.get("RANK", "?")
    try:
        summary = run_rank(model, text, samples, seq_len, out, overwrite, skip_nonfinite, observers, decode_steps, threads,
                           stream_layers, tokenizer)
    except EqcError as exc:
        _exit_now(f"error: rank {rank}: {exc}", exc.exit_code)
    except Exception as exc:  # a collective failing because a peer died lands here
        if os.environ.get("EQC_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _exit_now(f"error: rank {rank}: {type(exc).__name__}: {first}", 1)
    if summary is None:
        return
    path = os.environ.get("EQC_CALIB_SUMMARY")
    if path:
        pathlib.Path(path).write_text(json.dumps(summary, default=str))
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    elif not path:
        click.echo(f"calibrated {summary['tensors']} tensors on {summary['data']['samples']} windows with {summary['workers']} "
                   f"ranks in {summary['seconds']} s -> {out}")


if __name__ == "__main__":
    main()
