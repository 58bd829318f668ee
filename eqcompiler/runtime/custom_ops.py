"""Locating and registering eqc's ONNX Runtime custom-op library (domain `ai.eqc`).

The library is built by `make ops` (cuda_ops/build.sh) into build/cuda_ops/, and `make install` ships
a copy inside the package (beside this module):
- libeqc_ops.so: CPU kernels of ai.eqc::FusedInt8Gemm and ai.eqc::Int8WeightGemm, no CUDA
  dependency (the default);
- libeqc_ops_cuda.so: the same CPU kernels plus a CUDAExecutionProvider kernel of FusedInt8Gemm
  (built when nvcc exists). Only one of the two may be registered in a session: both define domain ai.eqc.
"""
from __future__ import annotations

import os
import pathlib
from typing import Iterator

import onnx
import onnxruntime as ort

from eqcompiler.errors import EnvironmentProblem

DOMAIN = "ai.eqc"
ENV_VAR = "EQC_OPS_LIB"
CPU_LIBRARY = "libeqc_ops.so"
CUDA_LIBRARY = "libeqc_ops_cuda.so"


class EqcOpsError(EnvironmentProblem):
    """The custom-op library is missing or onnxruntime refused to load it (one-line message)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _repo_build_dirs() -> Iterator[pathlib.Path]:
    """build/cuda_ops under every ancestor of this package and of the working directory.

    A non-editable install lives in <repo>/.venv/.../site-packages, so walking up from the
    package still reaches the repo; walking up from cwd covers other installs run from the repo.
    """
    seen: set[pathlib.Path] = set()
    for start in (pathlib.Path(__file__).resolve().parent, pathlib.Path.cwd().resolve()):
        for folder in (start, *start.parents):
            candidate = folder / "build" / "cuda_ops"
            if candidate not in seen:
                seen.add(candidate)
                yield candidate


def bundled_library_dir() -> pathlib.Path:
    """Where an installed eqc keeps the copy of the libraries it was built with: the package root."""
    return pathlib.Path(__file__).resolve().parents[1]


def find_library(cuda: bool = False) -> pathlib.Path:
    """Path of the op library: $EQC_OPS_LIB, else a checkout's build/cuda_ops/ (the freshest build while
    developing), else the copy shipped in the package (an install away from any checkout).

    `cuda=True` looks for libeqc_ops_cuda.so instead (ignored when $EQC_OPS_LIB is set).
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = pathlib.Path(env).expanduser()
        if not path.is_file():
            raise EqcOpsError(f"{ENV_VAR}={env} does not point to a file")
        return path.resolve()
    name = CUDA_LIBRARY if cuda else CPU_LIBRARY
    searched = [*_repo_build_dirs(), bundled_library_dir()]
    for folder in searched:
        if (folder / name).is_file():
            return (folder / name).resolve()
    raise EqcOpsError(f"{name} not found (set {ENV_VAR}, or run `make ops` to build it into build/cuda_ops/)")


def register(session_options: ort.SessionOptions, path: str | os.PathLike[str] | None = None) -> None:
    """Register the ai.eqc ops with `session_options`; raise EqcOpsError if the library cannot load."""
    lib = pathlib.Path(path) if path is not None else find_library()
    if not lib.is_file():
        raise EqcOpsError(f"eqc op library not found: {lib}")
    try:
        session_options.register_custom_ops_library(str(lib))
    except Exception as exc:  # ORT raises its own (pybind) exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EqcOpsError(f"onnxruntime could not load {lib}: {_one_line(first)}") from None


def _graph_uses_domain(graph: onnx.GraphProto) -> bool:
    for node in graph.node:
        if node.domain == DOMAIN:
            return True
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.HasField("g") else []
            if any(_graph_uses_domain(g) for g in [*subgraphs, *attr.graphs]):
                return True
    return False


def uses_eqc_domain(model: onnx.ModelProto | str | os.PathLike[str]) -> bool:
    """True when the model imports the ai.eqc opset or has a node in that domain."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)  # weights are not needed here
    if any(op.domain == DOMAIN for op in model.opset_import):
        return True
    if any(f.domain == DOMAIN or any(n.domain == DOMAIN for n in f.node) for f in model.functions):
        return True
    return _graph_uses_domain(model.graph)


def session_options_for(model: onnx.ModelProto | str | os.PathLike[str],
                        options: ort.SessionOptions | None = None, cuda: bool = False) -> ort.SessionOptions:
    """Session options (new, or `options`) with the op library registered when the model needs it."""
    opts = options if options is not None else ort.SessionOptions()
    if uses_eqc_domain(model):
        register(opts, find_library(cuda=cuda))
    return opts
