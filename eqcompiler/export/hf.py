"""Export a Hugging Face model to an eqc artifact (ONNX with KV-cache inputs/outputs).

Causal LMs get `past_key_values.{i}.key|value` inputs and `present.{i}.key|value` outputs with
dynamic batch / sequence / past axes, so one graph serves prefill (past length 0) and decode.
Export ends with a parity check of ONNX Runtime against PyTorch on a prompt and a decode step.

Memory: the exporter serializes the graph without its weights (_withheld_initializers); they are put back into
the onnx-ir model without a copy and written once, and the exporter's folded copies are dropped before the
parity check's ORT session opens (SmolLM2: 2.87 GB -> 1.66 GB peak RSS, byte-identical artifact).
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import tempfile
import time
import warnings
import weakref
from typing import Any, Iterator

import numpy as np
import onnx
import onnx_ir as ir

from eqcompiler.artifact import folder as art_mod
from eqcompiler.artifact.atomic import staged_dir
from eqcompiler.artifact.genai_config import write_genai_config
from eqcompiler.errors import EqcError, ParityError
from eqcompiler.compile.graph import embedding_gathers, find_linear_sites, weight_array
from eqcompiler.models.loaders import LoadedModel, load_source
from eqcompiler.runtime.memory import release_freed_memory

log = logging.getLogger(__name__)

EXPORT_OPSET = 18  # what the TorchScript exporter emits; bumped to TARGET_OPSET afterwards
TARGET_OPSET = 21  # opset 21: int4/uint4 and blocked Quantize/DequantizeLinear
PARITY_TOLERANCE = 1e-3  # max |ORT - torch| on logits, relative to max(1, max |torch logits|)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _text_config(model: Any) -> Any:
    """The decoder's own config (a multimodal config nests it; a text-only one is its own)."""
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _describe_model(model: Any) -> str:
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return f"model family '{model.config.model_type}' ({', '.join(map(str, archs))})"


_LAYOUTS: "weakref.WeakKeyDictionary[Any, dict[str, int]]" = weakref.WeakKeyDictionary()


def _kv_layout(model: Any) -> dict[str, int]:
    """Layers, KV heads and head size of the cache as the model itself writes it (one forward pass over two
    tokens), not as config attribute names say: families name them differently (num_key_value_heads,
    num_kv_heads, multi_query, ...), and the graph's past inputs must have the shapes its layers produce."""
    if model in _LAYOUTS:
        return dict(_LAYOUTS[model])
    import torch
    from transformers import DynamicCache

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)  # as _torch_export: no deprecation chatter
        try:
            out = model(input_ids=torch.zeros((1, 2), dtype=torch.long), past_key_values=DynamicCache(), use_cache=True)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise EqcError(f"cannot run {_describe_model(model)} with a KV cache: {type(exc).__name__}: {first}") from exc
    layers = list(getattr(getattr(out, "past_key_values", None), "layers", None) or [])
    shapes = {(tuple(getattr(layer, "keys", None).shape) if getattr(layer, "keys", None) is not None else None,
               tuple(getattr(layer, "values", None).shape) if getattr(layer, "values", None) is not None else None)
              for layer in layers}
    if len(shapes) != 1:
        raise EqcError(f"{_describe_model(model)} does not write one KV cache shape for every layer "
                       f"({len(layers)} layers, shapes {sorted(map(str, shapes))}); eqc's graphs take one per layer")
    keys, values = shapes.pop()
    if keys is None or keys != values or len(keys) != 4 or keys[0] != 1 or keys[2] != 2:
        raise EqcError(f"{_describe_model(model)} writes a KV cache eqc's graphs do not take (keys {keys}, values "
                       f"{values} for 2 tokens; expected both [batch, kv_heads, sequence, head_dim])")
    layout = {"num_layers": len(layers), "num_kv_heads": int(keys[1]), "head_dim": int(keys[3])}
    _LAYOUTS[model] = layout
    return dict(layout)


def _causal_wrapper(model: Any, num_layers: int) -> Any:
    import torch
    from transformers import DynamicCache

    class CausalLMWithFlatCache(torch.nn.Module):
        """Takes the cache as flat tensors and returns it as flat tensors (ONNX has no cache objects)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):  # type: ignore[no-untyped-def]
            # A cache of full layers, never built from the config: given one, transformers makes sliding-window
            # layers (Mistral, Gemma 2/3) that keep only the last window-1 positions and size their masks from
            # a Python counter the tracer would bake in. Here every layer's present is its past plus the new
            # tokens (the artifact's contract), and the window is applied by the sliding-window mask, which
            # transformers builds from config.sliding_window and the positions: the same attention.
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            flat = [out.logits]
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return tuple(flat)

    return CausalLMWithFlatCache().eval()


def _encoder_wrapper(model: Any) -> Any:
    import inspect

    import torch

    # DistilBERT, MPNet, ... have no token types: their forward does not name token_type_ids.
    token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    class EncoderLastHidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            extra = {"token_type_ids": token_type_ids} if token_types else {}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    return EncoderLastHidden().eval()


def causal_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "attention_mask", "position_ids"]
    inputs += [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return inputs, outputs


def causal_example(layout: dict[str, int], vocab: int, batch: int, seq: int, past: int, seed: int = 0,
                   pad_left: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for a causal graph: ids, mask (optionally left-padded), positions, past."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
    }
    if pad_left:
        feed["attention_mask"][0, :pad_left] = 0
    positions = np.cumsum(feed["attention_mask"], axis=1) - 1
    feed["position_ids"] = np.clip(positions[:, past:], 0, None).astype(np.int64)
    shape = (batch, layout["num_kv_heads"], past, layout["head_dim"])
    for i in range(layout["num_layers"]):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = rng.standard_normal(shape).astype(np.float32)
    return feed


def _export_causal(loaded: LoadedModel, path: pathlib.Path) -> tuple[dict[str, int], dict[str, Any]]:
    import torch

    layout = _kv_layout(loaded.model)
    wrapper = _causal_wrapper(loaded.model, layout["num_layers"])
    in_names, out_names = causal_io_names(layout["num_layers"])
    example = causal_example(layout, _text_config(loaded.model).vocab_size, batch=2, seq=4, past=3)
    args = tuple(torch.from_numpy(example[n]) for n in in_names)
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
               "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    for name in in_names[3:]:
        dynamic[name] = {0: "batch", 2: "past_sequence"}
    for name in out_names[1:]:
        dynamic[name] = {0: "batch", 2: "total_sequence"}
    withheld = _torch_export(wrapper, args, path, in_names, out_names, dynamic, loaded)
    return layout, withheld


def _export_encoder(loaded: LoadedModel, path: pathlib.Path) -> dict[str, Any]:
    import torch

    ids = torch.randint(0, loaded.model.config.vocab_size, (2, 8))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    names = list(ENCODER_INPUTS)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
    withheld = _torch_export(_encoder_wrapper(loaded.model), args, path, names, ["last_hidden_state"], dynamic, loaded)
    _keep_encoder_inputs(path)
    return withheld


def _keep_encoder_inputs(path: pathlib.Path) -> None:
    """Every encoder artifact takes ENCODER_INPUTS, which eqc feeds to encoders (calibrate, eval, bench); the tracer
    drops an input the model ignores (token_type_ids of a model without token types), so it is put back, unused."""
    proto = onnx.load(str(path), load_external_data=False)
    have = [i.name for i in proto.graph.input]
    if all(n in have for n in ENCODER_INPUTS):
        return
    for index, name in enumerate(ENCODER_INPUTS):
        if name not in have:
            proto.graph.input.insert(index, onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64,
                                                                                ["batch", "sequence"]))
            have.insert(index, name)
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _withheld_initializers(withheld: dict[str, Any]) -> Iterator[None]:
    """Keep the weights out of the TorchScript exporter's serialized model: `withheld` receives every initializer
    tensor (by its initializer name) and the exporter writes an empty one in its place.

    The exporter holds its ModelProto, the serialized string and a Python bytes copy of it at once, each with
    every weight, beside the torch model (SmolLM2: 2.87 GB peak RSS); without the weights in them, that step
    adds kilobytes. The hook is the exporter's initializer de-duplication, which hands over the final name ->
    tensor map right before serialization; a torch without it exports as before (nothing withheld).
    """
    import torch

    original = getattr(torch._C, "_jit_pass_onnx_deduplicate_initializers", None)
    if original is None:
        yield
        return

    def withhold(graph: Any, params: dict[str, Any], training: bool) -> dict[str, Any]:
        params = original(graph, params, training)
        withheld.update(params)
        return {name: torch.empty(0, dtype=t.dtype) for name, t in params.items()}

    torch._C._jit_pass_onnx_deduplicate_initializers = withhold
    try:
        yield
    finally:
        torch._C._jit_pass_onnx_deduplicate_initializers = original


def _torch_export(module: Any, args: tuple, path: pathlib.Path, in_names: list[str], out_names: list[str],
                  dynamic: dict[str, dict[int, str]], loaded: LoadedModel) -> dict[str, Any]:
    """Trace `module` into `path`; returns the initializer tensors withheld from the file (_withheld_initializers:
    _postprocess puts them back), or {} when the file holds them."""
    import torch

    withheld: dict[str, Any] = {}
    with warnings.catch_warnings(), torch.no_grad(), _withheld_initializers(withheld):
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        # The TorchScript exporter traces the HF module as is (eager attention, explicit masks);
        # it is fast and handles dynamic past length 0, which prefill needs.
        try:
            torch.onnx.export(module, args, str(path), input_names=in_names, output_names=out_names,
                              dynamic_axes=dynamic, opset_version=EXPORT_OPSET, dynamo=False,
                              do_constant_folding=True)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a model whose forward pass the tracer cannot take: say which and why
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise EqcError(f"cannot export {_describe_model(loaded.model)} to ONNX: {type(exc).__name__}: {first}") from exc
    return withheld


def _restore_initializers(model: ir.Model, withheld: dict[str, Any]) -> None:
    """Give the initializers the exporter wrote empty their tensors back, without copying them (each wraps the
    torch tensor's memory; the artifact's bytes are written from there)."""
    from onnx_ir.tensor_adapters import TorchTensor

    for name, value in model.graph.initializers.items():
        tensor = withheld.get(name)
        if tensor is None:
            continue
        value.const_value = TorchTensor(tensor.detach().contiguous(), name=name)
        value.shape = ir.Shape(tuple(tensor.shape))


def _postprocess(raw_path: pathlib.Path, withheld: dict[str, Any] | None = None) -> ir.Model:
    """Bump to opset 21 (only type extensions separate 18 from 21 for the ops emitted) and tidy up."""
    model = ir.load(raw_path)
    if withheld:
        _restore_initializers(model, withheld)
    model.opset_imports[""] = TARGET_OPSET
    model.graph.opset_imports[""] = TARGET_OPSET
    for node in model.graph.all_nodes():
        node.version = None
    from onnx_ir.passes.common import IdentityEliminationPass, RemoveUnusedNodesPass

    IdentityEliminationPass()(model)
    _gemm_to_matmul(model.graph)
    _tie_lm_head(model.graph)
    RemoveUnusedNodesPass()(model)
    _name_weights(model.graph)
    model.producer_name = "eqc"
    return model


def _gemm_to_matmul(graph: ir.Graph) -> None:
    """Write a linear layer the tracer emitted as Gemm (a 2-D addmm: GPT-2's Conv1D, a Linear over a flattened
    input) as MatMul (+ Add for the bias), as every other family's projections are, so that every pass and
    lowering written for MatMul layers (ort-cpu's MatMulNBits among them) takes it. Same arithmetic: alpha =
    beta = 1, no transA; a transB weight is stored transposed once (left as Gemm when something else reads it)."""
    names = {n.name for n in graph}
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        a, w = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            continue
        if w is None or w.const_value is None or w.shape is None or len(w.shape) != 2:
            continue
        if attrs.get_int("transB", 0):
            if len(w.uses()) != 1 or w.is_graph_input() or w.is_graph_output():
                continue
            w.const_value = ir.tensor(np.ascontiguousarray(w.const_value.numpy().T), name=w.name)
            w.shape = ir.Shape(w.const_value.shape)
        base = (node.name or "gemm").rsplit("/", 1)[0] if "/" in (node.name or "") else (node.name or "gemm")

        def fresh(op: str) -> str:
            name, i = f"{base}/{op}", 0
            while name in names:
                i += 1
                name = f"{base}/{op}_{i}"
            names.add(name)
            return name

        matmul = ir.node("MatMul", [a, w], name=fresh("MatMul"))
        new_nodes = [matmul]
        if bias is not None:
            new_nodes.append(ir.node("Add", [matmul.outputs[0], bias], name=fresh("Add")))
        old_out, new_out = node.outputs[0], new_nodes[-1].outputs[0]
        new_out.name, new_out.shape, new_out.type = old_out.name, old_out.shape, old_out.type
        old_out.name = None
        matmul.outputs[0].name = f"{matmul.name}_output_0"
        if bias is not None:
            matmul.outputs[0].shape, matmul.outputs[0].type = old_out.shape, old_out.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old_out], [new_out])


def _name_weights(graph: ir.Graph) -> None:
    """Give traced weights ('onnx::MatMul_8142') the layer's name, so plans and reports read well."""
    for site in find_linear_sites(graph):
        w = site.weight
        if w.name and w.name.startswith("onnx::") and len(w.uses()) == 1:
            target = f"{site.name}.weight_t" if not site.transposed else f"{site.name}.weight"
            if target not in graph.initializers:
                w.name = target


def _tie_lm_head(graph: ir.Graph) -> None:
    """The tracer stores a tied lm_head as a transposed copy of the embedding; read the table instead.

    This keeps one copy on disk (ORT folds the Transpose at load) and lets quantization treat the
    shared table once, instead of leaving a fp32 copy behind.
    """
    tables = {tuple(g.inputs[0].shape): g.inputs[0] for g in embedding_gathers(graph)}
    for site in find_linear_sites(graph):
        if site.transposed:
            continue
        k, n = site.weight.shape
        table = tables.get((n, k))
        if table is None or len(site.weight.uses()) != 1:
            continue
        if not np.array_equal(weight_array(table).T, weight_array(site.weight)):
            continue
        transpose = ir.node("Transpose", [table], {"perm": [1, 0]}, name=f"{site.node.name}/tied_weight_transpose")
        graph.insert_before(site.node, transpose)
        old = site.weight
        site.node.replace_input_with(1, transpose.outputs[0])
        graph.initializers.pop(old.name)


def torch_reference(loaded: LoadedModel, feed: dict[str, np.ndarray], names: list[str] | None = None) -> list[np.ndarray]:
    """PyTorch's outputs for `feed`. The wrapper's arguments are taken from `feed` by name (every one of them:
    the graph may lack an input the model ignores, e.g. position_ids under ALiBi); `names` is not needed."""
    import torch

    if loaded.task == "causal-lm":
        num_layers = _kv_layout(loaded.model)["num_layers"]
        wrapper, arg_names = _causal_wrapper(loaded.model, num_layers), causal_io_names(num_layers)[0]
    else:
        wrapper, arg_names = _encoder_wrapper(loaded.model), ENCODER_INPUTS
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = wrapper(*[torch.from_numpy(feed[n]) for n in arg_names])
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def check_parity(loaded: LoadedModel, model_path: pathlib.Path, tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """ORT vs PyTorch on a prompt (past 0) and a decode step (one token, past > 0)."""
    from eqcompiler.runtime.session import make_session

    session = make_session(model_path)
    names = [i.name for i in session.get_inputs()]
    cases: list[tuple[str, dict[str, np.ndarray]]]
    vocab = _text_config(loaded.model).vocab_size
    if loaded.task == "causal-lm":
        layout = _kv_layout(loaded.model)
        cases = [("prompt", causal_example(layout, vocab, batch=2, seq=7, past=0, seed=1)),
                 ("decode", causal_example(layout, vocab, batch=2, seq=1, past=9, seed=2)),
                 ("padded", causal_example(layout, vocab, batch=2, seq=6, past=0, seed=3, pad_left=2))]
    else:
        rng = np.random.default_rng(1)
        ids = rng.integers(0, vocab, (2, 9), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[1, 6:] = 0
        cases = [("prompt", {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})]
    report: dict[str, Any] = {"tolerance": tolerance, "metric": "max|ort-torch| / max(1, max|torch|) on the first output"}
    for case, feed in cases:
        try:
            ort_out = session.run(None, {n: feed[n] for n in names})
        except Exception as exc:  # the traced graph baked in a shape of the example: it fails on other lengths
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ParityError(f"export parity failed on the {case} case: ONNX Runtime cannot run the exported graph of "
                              f"{_describe_model(loaded.model)} ({first})") from exc
        ref = torch_reference(loaded, feed, names)
        if case == "padded":  # padded query rows are garbage by design; compare real tokens only
            ort_first, ref_first = ort_out[0][1:], ref[0][1:]
            ort_first = np.concatenate([ort_first.reshape(-1), ort_out[0][0, 2:].reshape(-1)])
            ref_first = np.concatenate([ref_first.reshape(-1), ref[0][0, 2:].reshape(-1)])
        else:
            ort_first, ref_first = ort_out[0], ref[0]
        err = float(np.max(np.abs(ort_first - ref_first)) / max(1.0, float(np.max(np.abs(ref_first)))))
        report[case] = err
        if not np.isfinite(err) or err > tolerance:
            raise ParityError(f"export parity failed on the {case} case: error {err:.2e} > tolerance {tolerance:.0e}")
    return report


def export(src: str, out: pathlib.Path, overwrite: bool = False, check: bool = True,
           trust_remote_code: bool = False) -> dict[str, Any]:
    """Export `src` into the artifact folder `out`; returns the manifest, plus `export_seconds` (a fact about
    this run, not written into the artifact: the same source exports to the same bytes)."""
    start = time.perf_counter()
    # -o is claimed before the model is loaded: every refusal of it comes before any work.
    with staged_dir(pathlib.Path(out), overwrite=overwrite) as stage:
        loaded = load_source(src, trust_remote_code=trust_remote_code)
        with tempfile.TemporaryDirectory(dir=stage) as raw_dir:
            raw_path = pathlib.Path(raw_dir) / "raw.onnx"
            layout: dict[str, int] | None = None
            if loaded.task == "causal-lm":
                layout, withheld = _export_causal(loaded, raw_path)
            else:
                withheld = _export_encoder(loaded, raw_path)
            model = _postprocess(raw_path, withheld)
            art_mod.save_ir(model, stage)
        # Only the graph's inputs and outputs are needed from here: the exporter's folded weight copies go
        # before ORT loads the artifact for the parity check beside the torch model.
        io_spec = {"inputs": _io_spec(model.graph.inputs), "outputs": _io_spec(model.graph.outputs)}
        del model, withheld
        release_freed_memory()
        onnx.checker.check_model(str(stage / art_mod.MODEL_FILE))
        parity = check_parity(loaded, stage / art_mod.MODEL_FILE) if check else {"skipped": True}
        loaded.model.config.save_pretrained(stage)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(stage)
        manifest = build_manifest(loaded, io_spec, layout, parity)
        art_mod.write_manifest(stage, manifest)
        write_genai_config(stage, manifest)
    return {**manifest, "export_seconds": round(time.perf_counter() - start, 1)}


def _io_spec(values: Any) -> list[dict[str, Any]]:
    spec = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in v.shape] if v.shape is not None else None
        spec.append({"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": dims})
    return spec


def build_manifest(loaded: LoadedModel, io_spec: dict[str, list[dict[str, Any]]], layout: dict[str, int] | None,
                   parity: dict[str, Any]) -> dict[str, Any]:
    """The manifest; `io_spec`: the graph's {"inputs": _io_spec(...), "outputs": _io_spec(...)}."""
    tok = loaded.tokenizer
    manifest: dict[str, Any] = {
        "task": loaded.task,
        "family": loaded.family,
        "source": loaded.source,
        "opset": TARGET_OPSET,
        "inputs": io_spec["inputs"],
        "outputs": io_spec["outputs"],
        "parity": parity,
        "quantization": None,
        "tokenizer": {
            "bos_token_id": getattr(tok, "bos_token_id", None),
            "eos_token_id": getattr(tok, "eos_token_id", None),
            "pad_token_id": getattr(tok, "pad_token_id", None),
        } if tok is not None else None,
    }
    if layout is not None:
        manifest["kv_cache"] = {
            **layout,
            "layout": ["batch", "num_kv_heads", "sequence", "head_dim"],
            "past_input": "past_key_values.{layer}.{key|value}",
            "present_output": "present.{layer}.{key|value}",
            "dtype": "float32",
            "quantized": None,
        }
    return manifest
