"""An ONNX graph as a torch module, for the torch runtime (`runtime: torch`).

Why not onnx2torch: its package imports torchvision on import (for its NMS and
RoIAlign converters), and PyPI's torchvision does not import beside the CPU
torch that this project pins, so the CPU tests could not run it. The graph of a
classifier needs few operators, so this module converts them itself, in two steps:

1. **Fold.** Every node whose inputs are all constants is evaluated once with
   onnx's reference evaluator. EfficientNet-Lite0's TF-style "same" padding is
   ~190 such nodes per export (Constant, ConstantOfShape, Slice, Transpose,
   Cast ...), which leave one constant `pads` input per Pad.
2. **Map.** What is left maps onto torch: Conv, Gemm and MatMul become modules
   (so `.to(dtype, memory_format)` converts their weights), the rest functions.
   Shape arithmetic on the input (Shape, Gather, Unsqueeze, Concat feeding a
   Reshape) runs on the tensor's Python-side shape, never on the device, so a
   batch never waits for a device-to-host copy and CUDA graphs can capture it.

An operator outside the table raises `UnsupportedGraph` naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

Value = Any  # a torch.Tensor (data) or a numpy array (constants, shapes)


class UnsupportedGraph(ValueError):
    """The ONNX graph uses an operator this converter does not map."""


@dataclass(frozen=True)
class Step:
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict[str, Any]
    module: str | None = None  # key into the module's `layers`


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _fold(node: onnx.NodeProto, known: dict[str, np.ndarray]) -> list[np.ndarray]:
    if node.op_type == "Constant":
        return [numpy_helper.to_array(_attrs(node)["value"])]
    graph = onnx.helper.make_graph(
        [node],
        "fold",
        [
            onnx.helper.make_tensor_value_info(i, onnx.TensorProto.UNDEFINED, None)
            for i in node.input
            if i
        ],
        [
            onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
            for o in node.output
        ],
    )
    evaluator = ReferenceEvaluator(onnx.helper.make_model(graph))
    feeds = {i: known[i] for i in node.input if i}
    return [np.asarray(v) for v in evaluator.run(None, feeds)]


def _conv(
    attrs: dict[str, Any], w: np.ndarray, b: np.ndarray | None, extra: tuple[int, int] = (0, 0)
) -> nn.Conv2d:
    if w.ndim != 4 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedGraph("only 2-D Conv with explicit pads is supported")
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    top, left, bottom, right = top + extra[0], left + extra[1], bottom + extra[0], right + extra[1]
    if (top, left) != (bottom, right):
        raise UnsupportedGraph(f"asymmetric Conv pads {attrs['pads']}")
    conv = nn.Conv2d(
        w.shape[1] * attrs.get("group", 1),
        w.shape[0],
        tuple(w.shape[2:]),
        stride=tuple(attrs.get("strides", [1, 1])),
        padding=(top, left),
        dilation=tuple(attrs.get("dilations", [1, 1])),
        groups=attrs.get("group", 1),
        bias=b is not None,
    )
    conv.weight.data = torch.from_numpy(w.copy())
    if b is not None and conv.bias is not None:
        conv.bias.data = torch.from_numpy(b.copy())
    return conv


def _linear(w: np.ndarray, b: np.ndarray | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    lin.weight.data = torch.from_numpy(w.copy())
    if b is not None and lin.bias is not None:
        lin.bias.data = torch.from_numpy(b.copy())
    return lin


def _gemm_module(attrs: dict[str, Any], args: list[np.ndarray | None]) -> nn.Linear:
    w, b = args[1], args[2] if len(args) > 2 else None
    if w is None or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        raise UnsupportedGraph("Gemm needs constant weights, no transA, alpha 1")
    if attrs.get("beta", 1.0) != 1.0:
        raise UnsupportedGraph("Gemm with beta != 1")
    return _linear(w if attrs.get("transB", 0) else w.T, b)


def _torch_pads(pads: np.ndarray) -> list[int]:
    """ONNX [x1_begin, x2_begin, ..., x1_end, x2_end] -> torch's last-dim-first pairs."""
    n = len(pads) // 2
    out: list[int] = []
    for d in reversed(range(n)):
        out += [int(pads[d]), int(pads[d + n])]
    while len(out) > 2 and out[-2:] == [0, 0]:
        out = out[:-2]  # F.pad pads only the trailing dimensions it is given
    return out


def _reshape(x: torch.Tensor, shape: np.ndarray, allowzero: int) -> torch.Tensor:
    dims = [int(s) for s in shape]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _clip(x: torch.Tensor, lo: np.ndarray | None, hi: np.ndarray | None) -> torch.Tensor:
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


TensorFn = Callable[..., Value]
ARITH = frozenset({"Add", "Sub", "Mul", "Div"})
LAYERS = frozenset({"Conv", "Gemm", "MatMul"})  # nn modules: weights follow `.to()`
# Data ops: the first input is a tensor, the others constants (or shapes).
TENSOR_OPS: dict[str, Callable[[dict[str, Any]], TensorFn]] = {
    "Clip": lambda a: _clip,
    "Relu": lambda a: F.relu,
    "Sigmoid": lambda a: torch.sigmoid,
    "Add": lambda a: torch.add,
    "Sub": lambda a: torch.sub,
    "Mul": lambda a: torch.mul,
    "Div": lambda a: torch.div,
    "Pad": lambda a: (
        lambda x, pads, value=None: F.pad(
            x, _torch_pads(pads), value=0.0 if value is None else float(value)
        )
    ),
    "GlobalAveragePool": lambda a: lambda x: x.mean(dim=(2, 3), keepdim=True),
    "Flatten": lambda a: lambda x: x.flatten(a.get("axis", 1)),
    "Reshape": lambda a: lambda x, shape: _reshape(x, shape, a.get("allowzero", 0)),
    "Identity": lambda a: lambda x: x,
    "Softmax": lambda a: lambda x: torch.softmax(x, a.get("axis", -1)),
}
# Shape ops on numpy arrays: the input's shape, read on the host.
SHAPE_OPS: dict[str, Callable[[dict[str, Any]], TensorFn]] = {
    "Shape": lambda a: lambda x: np.asarray(x.shape, dtype=np.int64),
    "Gather": lambda a: lambda x, i: np.take(x, i, axis=a.get("axis", 0)),
    "Unsqueeze": lambda a: lambda x, axes: np.expand_dims(x, tuple(int(v) for v in axes)),
    "Concat": lambda a: lambda *xs: np.concatenate([np.atleast_1d(x) for x in xs], a["axis"]),
    "Cast": lambda a: lambda x: x,
}


class OnnxModule(nn.Module):
    """Runs the converted steps in the graph's (topological) order."""

    def __init__(
        self,
        steps: list[tuple[Step, TensorFn | None]],
        consts: dict[str, np.ndarray],
        layers: dict[str, nn.Module],
        io: tuple[str, str],
    ) -> None:
        super().__init__()
        self.steps = steps
        self.layers = nn.ModuleDict(layers)
        self.input_name, self.output_name = io
        # Constants that meet data in arithmetic are buffers, so that `.to()` moves and
        # casts them with the weights; the rest (pads, shapes, bounds) stay on the host.
        arith = {i for s, _ in steps if s.op in ARITH for i in s.inputs if i in consts}
        self.host = {k: v for k, v in consts.items() if k not in arith}
        self.names = {k: f"c{n}" for n, k in enumerate(sorted(arith))}
        for k, buf in self.names.items():
            self.register_buffer(buf, torch.from_numpy(np.array(consts[k])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, Value] = {self.input_name: x, **self.host}
        env |= {k: getattr(self, buf) for k, buf in self.names.items()}
        for step, fn in self.steps:
            if step.module is not None:
                env[step.output] = self.layers[step.module](env[step.inputs[0]])
            else:
                assert fn is not None
                env[step.output] = fn(*[env[i] if i else None for i in step.inputs])
        out: torch.Tensor = env[self.output_name]
        return out


def _symmetric_pad(step: Step, consts: dict[str, np.ndarray]) -> tuple[int, int] | None:
    """(rows, columns) of a zero Pad that pads H and W alike on both sides, else None."""
    pads = consts.get(step.inputs[1])
    value = consts.get(step.inputs[2]) if len(step.inputs) > 2 and step.inputs[2] else None
    mode = step.attrs.get("mode", b"constant")
    if pads is None or len(pads) != 8 or mode not in (b"constant", "constant"):
        return None
    if (value is not None and float(value) != 0.0) or any(pads[[0, 1, 4, 5]]):
        return None
    top, left, bottom, right = (int(v) for v in pads[[2, 3, 6, 7]])
    return (top, left) if (top, left) == (bottom, right) else None


def _fusable_pad(
    steps: list[tuple[Step, TensorFn | None]],
    node: onnx.NodeProto,
    consts: dict[str, np.ndarray],
    uses: dict[str, int],
) -> tuple[Step, tuple[int, int]] | None:
    """The Pad step right before this Conv, read by it alone, and its padding."""
    if node.op_type != "Conv" or not steps or uses.get(node.input[0]) != 1:
        return None
    last = steps[-1][0]
    if last.op != "Pad" or last.output != node.input[0]:
        return None
    pad = _symmetric_pad(last, consts)
    return None if pad is None else (last, pad)


def _module(
    node: onnx.NodeProto, consts: dict[str, np.ndarray], extra: tuple[int, int]
) -> nn.Module:
    args = [consts.get(i) for i in node.input]
    if any(a is None for a in args[1:]):
        raise UnsupportedGraph(f"{node.op_type} weights must be constants")
    if node.op_type == "Conv":
        return _conv(_attrs(node), args[1], args[2] if len(args) > 2 else None, extra)  # type: ignore[arg-type]
    if node.op_type == "Gemm":
        return _gemm_module(_attrs(node), args)
    w = args[1]
    assert w is not None
    if w.ndim != 2:
        raise UnsupportedGraph("MatMul with a constant 2-D right side only")
    return _linear(w.T, None)


def convert(model: onnx.ModelProto) -> OnnxModule:
    """The module computing the graph's (single) output from its (single) input."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in inits]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise UnsupportedGraph(f"one input and one output expected, got {inputs}")
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shaped: set[str] = set()  # values that are shape arithmetic on the input
    steps: list[tuple[Step, TensorFn | None]] = []
    layers: dict[str, nn.Module] = {}
    uses: dict[str, int] = {}
    for node in graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    for node in graph.node:
        if all(i in consts for i in node.input if i):
            consts.update(zip(node.output, _fold(node, consts), strict=True))
            continue
        step = Step(node.op_type, tuple(node.input), node.output[0], _attrs(node))
        data = {i for i in node.input if i and i not in consts}
        if node.op_type in SHAPE_OPS and (node.op_type == "Shape" or data <= shaped):
            shaped.add(step.output)
            steps.append((step, SHAPE_OPS[node.op_type](step.attrs)))
        elif node.op_type in LAYERS:
            pad = _fusable_pad(steps, node, consts, uses)
            source = node.input[0]
            if pad is not None:  # the Pad becomes the Conv's own padding: one pass less
                source = steps.pop()[0].inputs[0]
            key = f"l{len(layers)}"
            layers[key] = _module(node, consts, pad[1] if pad else (0, 0))
            steps.append((Step(step.op, (source,), step.output, {}, key), None))
        elif node.op_type in TENSOR_OPS:
            steps.append((step, TENSOR_OPS[node.op_type](step.attrs)))
        else:
            raise UnsupportedGraph(f"no torch mapping for ONNX operator {node.op_type}")
    used = {i for s, _ in steps for i in s.inputs}
    kept = {k: v for k, v in consts.items() if k in used}
    return OnnxModule(steps, kept, layers, (inputs[0], graph.output[0].name))


def load(path: Path) -> tuple[OnnxModule, onnx.ModelProto]:
    model = onnx.load(str(path))
    return convert(model), model


def shapes(values: Sequence[onnx.ValueInfoProto]) -> list[tuple[str, list[int | str]]]:
    """(name, shape) per value, dims as onnxruntime reports them (str for symbolic)."""
    out = []
    for v in values:
        dims = v.type.tensor_type.shape.dim
        out.append(
            (v.name, [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims])
        )
    return out
