"""A load-time graph rewrite: compute the layers above a cross-encoder's pooling for the one row it pools.

A BERT or XLM-R cross-encoder scores from one token row: the pooler reads `Gather(hidden, 0, axis=1)` (the CLS row;
index -1, the last row, for a decoder pooled at its last token). Everything between the last attention and that
Gather works token by token (the attention output projection, the residual adds, the layer norms, the feed-forward
network), so it needs only that row. `pool_row_only` moves the Gather up to where the per-token work begins: it finds
the region of per-token operations whose results reach nothing but the pooling Gather, and feeds that region the
pooled row of each tensor that enters it. Same math on fewer rows: the f32 scores are the same (the parity guard
compares the rewritten serving compile with an f32 compile of the original IR on every start).

A model it cannot recognise (mean pooling, a pooling index computed from the input, no per-token operation under the
Gather) is left untouched, and the report says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# elementwise operations under numpy broadcasting (every input may be an activation; FakeQuantize's ranges too)
ELEMENTWISE = frozenset((
    "Add", "Subtract", "Multiply", "Divide", "Power", "SquaredDifference", "Maximum", "Minimum", "FakeQuantize",
    "Convert", "Gelu", "Tanh", "Erf", "Sqrt", "Swish", "Sigmoid", "Relu", "Exp", "Abs", "Negative", "Clamp",
    "HSwish", "Mish", "SoftPlus", "Elu",
))
LAST_AXIS_REDUCTIONS = frozenset(("MVN", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"))
SEQUENCE_AXIS = 1
RANK = 3  # [batch, sequence, hidden]: the only layout rewritten


@dataclass(frozen=True)
class RowOnlyReport:
    """What `pool_row_only` did: `applied`, the pooled row ("CLS" or "last"), how many operations now run on that
    row only (`nodes`) and how many Gathers feed them (`gathers`); else `reason`."""

    applied: bool
    rows: str | None = None
    nodes: int = 0
    gathers: int = 0
    reason: str = ""

    def describe(self) -> dict:
        if self.applied:
            return {"pooled_row_only": True, "rows": self.rows, "nodes": self.nodes, "gathers": self.gathers}
        return {"pooled_row_only": False, "reason": self.reason}

    def log_line(self) -> str:
        if self.applied:
            return (f"graph rewrite: the {self.nodes} operations above the pooling run on the {self.rows} row only "
                    f"({self.gathers} Gathers)")
        return f"graph rewrite: not applied: {self.reason}"


def _const(output) -> np.ndarray | None:
    node = output.get_node()
    return node.get_data() if node.get_type_name() == "Constant" else None


def _rank(output) -> int | None:
    shape = output.get_partial_shape()
    return None if shape.rank.is_dynamic else shape.rank.get_length()


def _static_dim(output, axis: int) -> int | None:
    shape = output.get_partial_shape()
    return shape[axis].get_length() if shape[axis].is_static else None


def pooling_row(node) -> int | None:
    """0 or -1 when `node` is a Gather that picks one constant row of a [batch, sequence, hidden] tensor's sequence
    axis (scalar or one-element index, batch_dims 0); else None."""
    if node.get_type_name() != "Gather" or _rank(node.input_value(0)) != RANK:
        return None
    if node.get_attributes().get("batch_dims", 0) != 0:
        return None
    indices, axis = _const(node.input_value(1)), _const(node.input_value(2))
    if indices is None or axis is None or axis.size != 1 or indices.size != 1:
        return None
    if int(axis.reshape(-1)[0]) not in (SEQUENCE_AXIS, SEQUENCE_AXIS - RANK):
        return None
    row = int(indices.reshape(-1)[0])
    return row if row in (0, -1) else None


def _has_parameter(output, seen: dict[int, bool]) -> bool:
    """Whether a Parameter feeds `output` (a weight and its decompression subgraph has none)."""
    node = output.get_node()
    key = node.get_instance_id()
    if key not in seen:
        seen[key] = node.get_type_name() == "Parameter" or any(
            _has_parameter(value, seen) for value in node.input_values())
    return seen[key]


def _activation_inputs(node, seen: dict[int, bool]) -> list[int] | None:
    """The inputs of a per-token operation that the walk may go up through; None when `node` is not one."""
    kind = node.get_type_name()
    if node.get_output_size() != 1 or _rank(node.output(0)) != RANK:
        return None
    if kind in ELEMENTWISE:
        if node.get_attributes().get("auto_broadcast", "numpy").lower() != "numpy":
            return None
        ranks = [_rank(value) for value in node.input_values()]
        if any(r is None or r > RANK or r == RANK - 1 for r in ranks):  # rank 2 would put its first axis on ours
            return None
        return [n for n, r in enumerate(ranks) if r == RANK and not _has_parameter_free(node.input_value(n), seen)]
    if kind == "MatMul":
        attributes = node.get_attributes()
        weight = node.input_value(1)
        if (attributes.get("transpose_a") or _rank(node.input_value(0)) != RANK or _rank(weight) != 2
                or _has_parameter(weight, seen)):
            return None
        return [0]
    if kind in LAST_AXIS_REDUCTIONS:
        axes = _const(node.input_value(1))
        if axes is None or _rank(node.input_value(0)) != RANK or any(int(a) % RANK != RANK - 1 for a in axes.ravel()):
            return None
        return [0]
    return None


def _has_parameter_free(output, seen: dict[int, bool]) -> bool:
    """A constant operand (no Parameter feeds it): kept, or gathered at the edge, never walked through."""
    return not _has_parameter(output, seen)


def pool_row_only(model) -> RowOnlyReport:
    """Rewrite `model` in place so that the per-token operations whose results reach only a pooling Gather of one
    constant sequence row compute that row only. Returns what it did; leaves the model untouched when it cannot."""
    import openvino.opset13 as ops

    poolings = [(node, pooling_row(node)) for node in model.get_ordered_ops()]
    poolings = [(node, row) for node, row in poolings if row is not None]
    if not poolings:
        return RowOnlyReport(False, reason="no Gather of one constant sequence row (CLS or last token) pools the "
                                           "hidden states: mean pooling, or an index computed from the input")
    inputs_before = [(p.get_any_name(), str(p.get_partial_shape())) for p in model.inputs]
    outputs_before = [str(o.get_partial_shape()) for o in model.outputs]
    seen: dict[int, bool] = {}
    nodes = gathers = 0
    for pooling, row in poolings:
        region: dict[int, object] = {}
        walk: dict[int, list[int]] = {}
        stack = [pooling.input_value(0).get_node()]
        while stack:  # every per-token operation reachable upwards from the pooling
            node = stack.pop()
            key = node.get_instance_id()
            if key in region:
                continue
            activations = _activation_inputs(node, seen)
            if activations is None:
                continue
            region[key], walk[key] = node, activations
            stack.extend(node.input_value(n).get_node() for n in activations)
        allowed = {pooling.get_instance_id()}
        changed = True
        while changed:  # keep only operations whose every consumer is in the region (or the pooling itself)
            changed = False
            for key, node in list(region.items()):
                consumers = [target.get_node().get_instance_id() for output in node.outputs()
                             for target in output.get_target_inputs()]
                if any(c not in region and c not in allowed for c in consumers):
                    del region[key]
                    changed = True
        if not region:
            continue
        row_index = ops.constant(np.array([row], np.int64))
        axis = ops.constant(np.array(SEQUENCE_AXIS, np.int64))
        edge: dict[tuple[int, int], object] = {}
        for node in region.values():  # feed the region the pooled row of everything entering it
            for n, value in enumerate(node.input_values()):
                source = value.get_node()
                if source.get_instance_id() in region or _rank(value) != RANK:
                    continue
                if _static_dim(value, SEQUENCE_AXIS) == 1:
                    continue  # broadcasts along the sequence: the same for every row
                if node.get_type_name() == "MatMul" and n == 1:
                    continue
                source_key = (source.get_instance_id(), value.get_index())
                if source_key not in edge:
                    edge[source_key] = ops.gather(value, row_index, axis).output(0)
                    gathers += 1
                node.input(n).replace_source_output(edge[source_key])
        nodes += len(region)
    if not nodes:
        return RowOnlyReport(False, reason="nothing under the pooling Gather works token by token alone")
    model.validate_nodes_and_infer_types()
    if ([(p.get_any_name(), str(p.get_partial_shape())) for p in model.inputs] != inputs_before
            or [str(o.get_partial_shape()) for o in model.outputs] != outputs_before):
        raise RuntimeError("the pooled-row rewrite changed the model's inputs or outputs")
    found = {row for _, row in poolings}
    rows = "CLS" if found == {0} else "last" if found == {-1} else "CLS and last"
    return RowOnlyReport(True, rows, nodes, gathers)


def row_only_copy(model, enabled: bool = True):
    """(the model to serve, the report): a rewritten clone of `model`, or `model` itself when the rewrite is off or
    does not apply. `model` is never changed (the parity guard's reference compiles it)."""
    if not enabled:
        return model, RowOnlyReport(False, reason="turned off (--pooled-row-only off)")
    import openvino as ov

    if not isinstance(model, ov.Model):  # a test's stand-in
        return model, RowOnlyReport(False, reason="not an OpenVINO model")
    clone = model.clone()
    report = pool_row_only(clone)
    return (clone if report.applied else model), report
