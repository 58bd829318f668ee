"""compile.folds: where smooth_quant and awq fold a per-channel 1/s, on tiny graphs (which producer is found,
which is refused), and that awq, through it, folds into an RMSNorm weight and a gated MLP's up columns."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from eqcompiler.compile.folds import gated_up_projection, norm_fold, other_uses
from eqcompiler.compile.graph import find_linear_sites
from eqcompiler.passes.awq import find_fold

K = 8


def graph(nodes: list, inits: dict[str, np.ndarray], outputs: list[str]) -> ir.Graph:
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()]), opset_imports=[helper.make_opsetid("", 21)])
    return ir.serde.deserialize_model(proto).graph


def value(g: ir.Graph, name: str) -> ir.Value:
    return next(o for n in g for o in n.outputs if o.name == name)


def test_norm_fold_takes_a_gamma_mul_and_a_last_axis_layernorm_only() -> None:
    gamma, beta, w = np.ones(K, np.float32), np.zeros(K, np.float32), np.ones((K, 4), np.float32)
    g = graph([helper.make_node("Mul", ["x", "gamma"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
              {"gamma": gamma, "w": w}, ["y"])
    node, scale, bias = norm_fold(value(g, "h"), K)
    assert node.op_type == "Mul" and scale.name == "gamma" and bias is None
    assert norm_fold(value(g, "h"), K + 1) is None  # gamma has K channels
    for axis, found in ((-1, True), (0, False)):
        g = graph([helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=axis),
                   helper.make_node("MatMul", ["h", "w"], ["y"])], {"gamma": gamma, "beta": beta, "w": w}, ["y"])
        got = norm_fold(value(g, "h"), K)
        assert (got is not None) == found
        if found:
            assert [got[1].name, got[2].name] == ["gamma", "beta"]


def test_gated_up_projection_finds_up_and_its_bias_only_when_asked() -> None:
    wg, wu, wd = (np.ones((K, K), np.float32) for _ in range(3))
    g = graph([helper.make_node("MatMul", ["x", "wg"], ["gate"]), helper.make_node("Sigmoid", ["gate"], ["act"]),
               helper.make_node("MatMul", ["x", "wu"], ["up0"]), helper.make_node("Add", ["up0", "bu"], ["up"]),
               helper.make_node("Mul", ["act", "up"], ["h"]), helper.make_node("MatMul", ["h", "wd"], ["y"])],
              {"wg": wg, "wu": wu, "wd": wd, "bu": np.zeros(K, np.float32)}, ["y"])
    sites = {id(s.node): s for s in find_linear_sites(g)}
    site, bias = gated_up_projection(value(g, "h"), K, sites)
    assert site.weight.name == "wu" and bias.name == "bu"
    assert gated_up_projection(value(g, "h"), K, sites, with_bias=False) is None  # awq cannot divide a bias
    down = next(s for s in sites.values() if s.weight.name == "wd")
    assert other_uses(value(g, "h"), {id(down.node)}) == []


def test_awq_find_fold_through_the_shared_finders() -> None:
    w = np.ones((K, K), np.float32)
    g = graph([helper.make_node("Mul", ["x", "gamma"], ["h"]), helper.make_node("MatMul", ["h", "wq"], ["q"]),
               helper.make_node("MatMul", ["h", "wu"], ["up"]), helper.make_node("Mul", ["q", "up"], ["m"]),
               helper.make_node("MatMul", ["m", "wd"], ["y"])],
              {"gamma": np.ones(K, np.float32), "wq": w, "wu": w.copy(), "wd": w.copy()}, ["y"])
    sites = find_linear_sites(g)
    weights = {id(s.weight): [s] for s in sites}
    first = {id(s.node) for s in sites if s.weight.name in ("wq", "wu")}
    fold = find_fold(value(g, "h"), K, first, weights)
    assert [c.name for c in fold.constants] == ["gamma"] and fold.node.op_type == "Mul"
    down = next(s for s in sites if s.weight.name == "wd")
    # m = q * up: both operands come from single-use MatMuls; the first one (q) takes the fold
    assert find_fold(value(g, "m"), K, {id(down.node)}, weights).columns_of == id(sites[0].weight)
    assert find_fold(value(g, "h"), K, {id(sites[0].node)}, weights) is None  # h also feeds up
