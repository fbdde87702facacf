"""Static TensorRT readiness: which ops of an exported program torch-tensorrt could not convert.

Runs on a CPU without torch_tensorrt. It mirrors what `torch_tensorrt.dynamo.compile` does to a
program before partitioning, with its default settings and the facts in tensorrt_ops.json (read
from the torch-tensorrt wheel named there): the decomposition table, the lowering passes that
delete or swap ops, then the converter lookup. An op that fails here would run in PyTorch
between TensorRT engines (a graph break), or fail compilation with require_full_compilation.
"""

import json
import operator
from functools import cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch._decomp import get_decompositions
from torch._export.utils import _collect_all_valid_cia_ops_for_aten_namespace, _get_decomp_for_cia
from torch._ops import OpOverload, OpOverloadPacket

TENSORRT_OPS_JSON = Path(__file__).with_name("tensorrt_ops.json")


@cache
def tensorrt_ops() -> dict[str, Any]:
    """The converter and decomposition facts of one torch-tensorrt version (see the JSON's header)."""
    return json.loads(TENSORRT_OPS_JSON.read_text())


def op_name(op: OpOverload) -> str:
    """torch.ops.aten.add.Tensor → "aten::add.Tensor", the spelling of tensorrt_ops.json."""
    return f"{op.namespace}::{op.__name__}"


def _overloads(name: str) -> list[OpOverload]:
    """The OpOverloads a JSON name stands for: one, or all of a packet ("aten::matmul").
    Names this torch doesn't know stand for none: its graphs can't hold them."""
    namespace, _, dotted = name.partition("::")
    target: Any = getattr(torch.ops, namespace)
    for part in dotted.split("."):
        target = getattr(target, part, None)
        if target is None:
            return []
    if isinstance(target, OpOverloadPacket):
        return [getattr(target, overload) for overload in target.overloads()]
    return [target]


def _overload_set(names: list[str]) -> set[OpOverload]:
    return {op for name in names for op in _overloads(name)}


def decomposition_table() -> dict[OpOverload, Callable[..., Any]]:
    """Mirror of torch_tensorrt.dynamo.lowering.get_decompositions() with its defaults
    (no experimental decompositions, attention kept whole): torch's decompositions of the
    enabled list, plus every CompositeImplicitAutograd decomposition except the disabled list
    and attention. torch-tensorrt's own decompositions are left out: their code is not here,
    so their ops stay in the graph and count as handled (see `_is_convertible`)."""
    decompositions = tensorrt_ops()["decompositions"]
    enabled = get_decompositions([op for name in decompositions["enabled"] for op in _overloads(name)])
    kept = _overload_set(
        decompositions["disabled"] + decompositions["attention_kept"] + decompositions["torch_tensorrt"]
    )
    # The same private torch helpers torch-tensorrt calls for the CIA table.
    composite = {op: _get_decomp_for_cia(op) for op in _collect_all_valid_cia_ops_for_aten_namespace()}
    return {op: fn for op, fn in {**enabled, **composite}.items() if op not in kept}


def _has_symbolic_shape(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(
        isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool))
        or (isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape))
        for v in values
    )


def _is_dynamic(node: torch.fx.Node) -> bool:
    """torch-tensorrt's test: the node's own value or a direct node argument has a symbolic shape."""
    inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
    return any(_has_symbolic_shape(n.meta.get("val")) for n in (node, *inputs))


def _only_first_output_used(node: torch.fx.Node) -> bool:
    users = list(node.users)
    return len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0


def _lowered_ops(program: torch.export.ExportedProgram) -> list[tuple[str, bool]]:
    """(name, has dynamic shapes) of every OpOverload node torch-tensorrt would try to convert.

    Only OpOverload targets are checked. The other call_function targets of an exported graph
    are operator.getitem (picks one output of a multi-output op; torch-tensorrt's getitem
    evaluator converts it) and Python arithmetic on SymInts such as operator.mul for the
    batch size (torch-tensorrt has operator.* and torch.sym_* converters and computes them as
    shape tensors). Shape queries are ATen ops (aten.sym_size.int) and are checked like any op.
    Subgraphs on constants are not folded as torch-tensorrt's constant_fold would: stricter."""
    lowering = tensorrt_ops()["lowering"]
    deleted, replaced = set(lowering["deletes"]), lowering["replaces_when_only_first_output_used"]
    ops = []
    for node in program.run_decompositions(decomposition_table()).graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, OpOverload):
            continue
        name = op_name(node.target)
        if name in deleted:
            continue
        if name in replaced and _only_first_output_used(node):
            name = replaced[name]
        ops.append((name, _is_dynamic(node)))
    return ops


def _is_convertible(name: str, dynamic: bool) -> bool:
    facts = tensorrt_ops()
    packet = name.split(".")[0]  # a converter keyed on "aten::matmul" takes every overload
    if name in facts["converters"] or packet in facts["converters"]:
        # torch-tensorrt skips a converter without supports_dynamic_shapes on dynamic nodes.
        return not (dynamic and name in facts["static_shapes_only"])
    torch_tensorrt_own = facts["decompositions"]["torch_tensorrt"]
    return name in torch_tensorrt_own or packet in torch_tensorrt_own


def unsupported_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Ops torch-tensorrt has no converter for (for nodes with a dynamic batch: no converter
    that supports dynamic shapes), after its decompositions and lowering. Sorted, unique."""
    return sorted({name for name, dynamic in _lowered_ops(program) if not _is_convertible(name, dynamic)})


def validated_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Ops whose every converter has a capability validator that may still reject a node
    (top-k's k, dtype, shape limits...); tensorrt_ops.json["validated"] says which validator."""
    validated = tensorrt_ops()["validated"]
    return sorted({name for name, _ in _lowered_ops(program) if name in validated})
