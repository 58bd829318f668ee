"""A/B decode speed of artifact folders through onnxruntime-genai, interleaved: each folder loaded once in its own
process, rounds alternating between them, the same random 512-token prompt and 64 greedy new tokens per round;
prints each folder's median decode tokens/s over the rounds after the first.

    .venv/bin/python tools/genai_ab.py FOLDER_A FOLDER_B [...] [--rounds 6] [--threads 2]

For a kernel change, compare one artifact against a copy of itself whose op library (the .so its genai_config.json
names) is the other build. The folders' genai_config.json get `intra_op_num_threads` (a copy is written beside
each as genai_config.ab.json and swapped in for the run, then put back), since GenAI's default is half the CPUs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pathlib
import shutil
import time

import numpy as np


def worker(folder: str, conn) -> None:
    import onnxruntime_genai as og

    model = og.Model(folder)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        prompt, new = job
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + new, min_length=len(prompt) + new)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(prompt, np.int32))
        gen.generate_next_token()  # sampled from the prompt's logits
        start, steps = time.perf_counter(), 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        conn.send(steps / (time.perf_counter() - start))


def with_threads(folder: pathlib.Path, threads: int) -> pathlib.Path:
    """Save the folder's genai_config.json aside and write one with the thread count; returns the saved copy."""
    config = folder / "genai_config.json"
    saved = folder / "genai_config.ab.json"
    shutil.copy(config, saved)
    data = json.loads(config.read_text())
    data["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config.write_text(json.dumps(data, indent=4))
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=pathlib.Path)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, 512)]
    saved = [with_threads(f, args.threads) for f in args.folders]
    workers = []
    try:
        for folder in args.folders:
            parent, child = mp.Pipe()
            proc = mp.Process(target=worker, args=(str(folder), child))
            proc.start()
            parent.recv()
            workers.append((parent, proc))
        speeds: list[list[float]] = [[] for _ in args.folders]
        for r in range(args.rounds):
            for i, (conn, _) in enumerate(workers):
                conn.send((prompt, 64))
                tok_s = conn.recv()
                if r:  # the first round warms up
                    speeds[i].append(tok_s)
        for folder, s in zip(args.folders, speeds):
            print(f"{str(folder):50s} decode tok/s median {np.median(s):6.1f}  rounds {[round(x, 1) for x in s]}")
    finally:
        for conn, proc in workers:
            conn.send(None)
            proc.join()
        for folder, copy in zip(args.folders, saved):
            shutil.move(copy, folder / "genai_config.json")


if __name__ == "__main__":
    main()
