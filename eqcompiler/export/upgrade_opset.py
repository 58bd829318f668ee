"""Bring an ONNX model a user brings up to the opset eqc's passes emit (21: int4 and blocked Q/DQ).

torch.onnx writes opset 17-20, Optimum 14-18; onnx's version converter rewrites each op's form between
versions (Split's and Reduce*'s axes as inputs, ...). Its failure is turned into one line naming the op.
Weights in external data (torch.onnx's dynamo exporter writes model.onnx.data beside every graph) stay there:
the converter only rewrites nodes, and the converted model's tensors keep pointing at the source's folder.
"""
from __future__ import annotations

import onnx
import onnx_ir as ir

from eqcompiler.errors import EqcError


def upgrade_opset(model: ir.Model, target: int, where: str) -> tuple[ir.Model, int | None]:
    """`model` at default opset >= `target` (converted when older); returns it and the opset it came with
    (None when it needed no conversion)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    if opset >= target:
        return model, None
    # Serialized, an external tensor keeps only its location relative to the model file: note the folder.
    base_dirs = {t.const_value.base_dir for t in model.graph.initializers.values()
                 if isinstance(t.const_value, ir.ExternalTensor)}
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, target)
    except Exception as exc:  # onnx raises RuntimeError / ValidationError / ConvertError with the op in the text
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise EqcError(f"{where} uses default opset {opset}; converting it to opset {target} failed ({first}); "
                       "export it at opset 21 or newer") from None
    upgraded = ir.serde.deserialize_model(converted)
    for base_dir in base_dirs:  # one folder in practice: the model file's own
        ir.external_data.set_base_dir(upgraded.graph, base_dir)
    return upgraded, opset
