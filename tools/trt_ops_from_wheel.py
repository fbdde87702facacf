"""Regenerate trainer/export/tensorrt_ops.json from an unzipped torch-tensorrt wheel.

    python tools/trt_ops_from_wheel.py /tmp/trt/unzipped > trainer/export/tensorrt_ops.json

Reads the wheel's Python source with `ast` and never imports it (torch_tensorrt needs TensorRT
and CUDA). What it extracts, all as "namespace::name.overload" strings ("aten::name" when the
source names a whole OpOverloadPacket, which covers every overload):
- converters: every `@dynamo_tensorrt_converter(op, ...)` registration under dynamo/conversion,
  with the ops whose converters all lack `supports_dynamic_shapes` and the ops whose every
  converter carries a `capability_validator` (its source and docstring summary);
- decompositions: the enabled and disabled torch decomposition sets, torch-tensorrt's own
  decompositions, and the attention ops it keeps whole by default;
- lowering: the ops torch-tensorrt's lowering passes delete or swap before conversion.
"""

import ast
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Lowering passes (dynamo/lowering/passes) that change which ops reach the converters.
DELETING_PASSES = ("remove_assert_nodes.py", "remove_detach.py")
REPLACING_PASS = "replace_max_pool_with_indices.py"


@dataclass(frozen=True)
class Registration:
    op: str
    validator: str | None  # one-line description, None when the converter takes every node
    dynamic_shapes: bool


def op_name(expr: ast.expr) -> str | None:
    """The source's spelling of an op → the JSON's: `torch.ops.aten.add.Tensor` → "aten::add.Tensor"."""
    dotted = ast.unparse(expr)
    if dotted.startswith("torch.ops."):  # torch.ops.<namespace>.<op>[.<overload>]
        namespace, _, rest = dotted.removeprefix("torch.ops.").partition(".")
        return f"{namespace}::{rest}"
    if dotted.startswith("aten."):  # the lowering modules' `aten = torch.ops.aten`
        return f"aten::{dotted.removeprefix('aten.')}"
    if dotted.startswith(("operator.", "torch.")):  # Python-level targets: operator.getitem, torch.sym_min
        return dotted
    return None  # an op held in a variable (generated plugin and collective-op converters)


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def docstring_summary(tree: ast.Module, function: str) -> str | None:
    """The first paragraph of a module-level function's docstring, on one line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            doc = ast.get_docstring(node)
            return " ".join(doc.split("\n\n")[0].split()) if doc else None
    return None


def describe_validator(tree: ast.Module, expr: ast.expr) -> str:
    source = " ".join(ast.unparse(expr).split())
    called = expr.func if isinstance(expr, ast.Call) else expr
    doc = docstring_summary(tree, called.id) if isinstance(called, ast.Name) else None
    return f"{source}: {doc}" if doc else source


def converter_registrations(conversion_dir: Path) -> list[Registration]:
    found = []
    for path in sorted(conversion_dir.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for call in ast.walk(tree):
            if not (isinstance(call, ast.Call) and ast.unparse(call.func) == "dynamo_tensorrt_converter"):
                continue
            op = op_name(call.args[0]) if call.args else None
            enabled = keyword(call, "enabled")
            if op is None or (enabled is not None and ast.unparse(enabled) == "False"):
                continue
            validator = keyword(call, "capability_validator")
            dynamic = keyword(call, "supports_dynamic_shapes")
            found.append(Registration(
                op=op,
                validator=describe_validator(tree, validator) if validator is not None else None,
                dynamic_shapes=dynamic is not None and ast.unparse(dynamic) == "True",
            ))
    return found


def assigned_set(tree: ast.Module, variable: str) -> list[str]:
    """The op names in a module-level `variable = {...}` set literal."""
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Set):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(ast.unparse(t) == variable for t in targets):
                return sorted(name for e in node.value.elts if (name := op_name(e)))
    raise ValueError(f"no set literal assigned to {variable}")


def own_decompositions(tree: ast.Module) -> list[str]:
    """Ops that torch-tensorrt decomposes with its own functions (the first argument of every
    `register_torch_trt_decomposition(op, ...)` and `replace_inplace_op(op, ...)` call)."""
    registering = {"register_torch_trt_decomposition", "replace_inplace_op"}
    return sorted({
        name
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and ast.unparse(call.func) in registering
        and (name := op_name(call.args[0]))
    })


def attention_kept(decompositions: ast.Module) -> list[str]:
    """Attention ops left whole unless compile(decompose_attention=True); converters handle
    them. Versions before that option (2.8) always decompose attention: none are kept."""
    if "ATTENTION_DECOMPOSITION_OPS" not in ast.unparse(decompositions):
        return []
    return assigned_set(decompositions, "ATTENTION_DECOMPOSITION_OPS")


def lowering_changes(passes_dir: Path) -> dict[str, object]:
    # The deleting passes test `node.target == torch.ops.aten.X.overload`.
    deleted = {
        name
        for file in DELETING_PASSES
        for node in ast.walk(ast.parse((passes_dir / file).read_text()))
        if isinstance(node, ast.Compare) and ast.unparse(node.left) == "node.target"
        for compared in node.comparators if (name := op_name(compared))
    }
    replacing = ast.parse((passes_dir / REPLACING_PASS).read_text())
    replaced = {
        op_name(key): op_name(value)
        for node in ast.walk(replacing) if isinstance(node, ast.Dict)
        for key, value in zip(node.keys, node.values)
    }
    return {
        "deletes": sorted(deleted),
        # Swapped only when the op's sole user takes output 0 (the indices are unused).
        "replaces_when_only_first_output_used": dict(sorted(replaced.items())),
    }


def module_constant(path: Path, name: str) -> str:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(ast.unparse(t) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError(f"{name} not found in {path}")


def tensorrt_ops(wheel_dir: Path) -> dict[str, object]:
    package = wheel_dir / "torch_tensorrt"
    lowering = package / "dynamo" / "lowering"
    registrations = converter_registrations(package / "dynamo" / "conversion")
    by_op: dict[str, list[Registration]] = defaultdict(list)
    for registration in registrations:
        by_op[registration.op].append(registration)
    groups = ast.parse((lowering / "_decomposition_groups.py").read_text())
    decompositions = ast.parse((lowering / "_decompositions.py").read_text())
    return {
        "torch_tensorrt_version": module_constant(package / "_version.py", "__version__"),
        "tensorrt_version": module_constant(package / "_version.py", "__tensorrt_version__"),
        "generated_by": "tools/trt_ops_from_wheel.py",
        "converters": sorted(by_op),
        "static_shapes_only": sorted(op for op, regs in by_op.items() if not any(r.dynamic_shapes for r in regs)),
        # Ops with no unconditional converter: a validator may reject a node and leave it to PyTorch.
        "validated": {
            op: sorted({r.validator for r in regs})
            for op, regs in sorted(by_op.items()) if all(r.validator for r in regs)
        },
        "decompositions": {
            "enabled": assigned_set(groups, "torch_enabled_decompositions"),
            "disabled": assigned_set(groups, "torch_disabled_decompositions"),
            "torch_tensorrt": own_decompositions(decompositions),
            "attention_kept": attention_kept(decompositions),
        },
        "lowering": lowering_changes(lowering / "passes"),
    }


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    json.dump(tensorrt_ops(Path(sys.argv[1])), sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
