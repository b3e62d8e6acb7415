"""A load-time graph rewrite: compute what lies under a cross-encoder's pooling for the one row it pools.

A BERT or XLM-R cross-encoder scores from one token row: the pooler reads `Gather(hidden, 0, axis=1)` (the CLS row;
index -1, the last row, for a model pooled at its last token). In the last layer, that row's output needs only that
row of the attention output projection, the residual adds, the layer norms and the feed-forward network, and only
that query row of the attention (its keys and values still come from every token). `pool_row_only` finds the
operations that work row by row along the pooled axis and whose results reach nothing but the pooling, and feeds
them the pooled row of each tensor entering them, which is a Gather inserted at that edge. Rules (`_row_axes_at`):
elementwise operations under numpy broadcasting (Add, Multiply, Convert, Gelu, FakeQuantize, ...: every input's
row, or the input whole where it has no such axis or it is 1), MVN and reductions over later axes, Softmax over
another axis, Transpose (the row's axis is followed through the permutation), Reshape whose pattern copies every
axis up to the row's (special_zero 0s), the left side of any MatMul (rows of A @ B need only those rows of A), and
non-causal ScaledDotProductAttention (the query's row and the mask's). An operation with another consumer (the
layer input that also feeds the keys and values, a ShapeOf, a model output) is never changed: its consumers on the
path get its row through a new Gather. Same math on fewer rows: the f32 logits are the same (tests/test_graphopt.py
measures 0.0 on the fixtures; the parity guard compares the rewritten serving compile with an f32 compile of the
original IR on every start).

A model it cannot recognise (mean pooling, a pooling index computed from the input, no row-wise operation under the
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
REDUCTIONS = frozenset(("MVN", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2"))
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


def pools_first_row(model) -> bool:
    """Whether `model` scores from its first token row (a CLS-pooled encoder: BERT, XLM-R): a Gather of the
    constant row 0 of a [batch, sequence, hidden] tensor. Decoder rerankers pool the last token instead."""
    import openvino as ov

    if not isinstance(model, ov.Model):  # a test's stand-in
        return False
    return any(pooling_row(node) == 0 for node in model.get_ordered_ops())


def _has_parameter(output, seen: dict[int, bool]) -> bool:
    """Whether a Parameter feeds `output` (a weight and its decompression subgraph has none). Iterative: the path
    from a deep model's last layer down to its inputs is longer than Python's recursion limit."""
    root = output.get_node()
    stack = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        key = node.get_instance_id()
        if key in seen:
            continue
        sources = [value.get_node() for value in node.input_values()]
        if node.get_type_name() == "Parameter":
            seen[key] = True
        elif inputs_done:
            seen[key] = any(seen[source.get_instance_id()] for source in sources)
        else:
            stack.append((node, True))
            stack.extend((source, False) for source in sources if source.get_instance_id() not in seen)
    return seen[root.get_instance_id()]


def _row_axes_at(node, axis: int) -> dict[int, int | None] | None:
    """How `node`'s output row `axis` maps onto its inputs: {input: that input's row axis, or None when every output
    row uses the input whole}; None when row `axis` of the output does not depend on one row of each input."""
    if node.get_output_size() != 1:
        return None
    rank = _rank(node.output(0))
    ranks = [_rank(value) for value in node.input_values()]
    if rank is None or not 0 <= axis < rank or any(r is None for r in ranks):
        return None
    kind = node.get_type_name()
    attributes = node.get_attributes()
    if kind in ELEMENTWISE:
        if str(attributes.get("auto_broadcast", "numpy")).lower() != "numpy":
            return None
        return {n: (axis - (rank - r) if axis - (rank - r) >= 0 else None) for n, r in enumerate(ranks)}
    if kind == "MatMul":  # output row `axis` is A's row: the rows of A @ B are independent
        if axis != rank - 2 or min(ranks) < 2:
            return None
        return {0: ranks[0] - 1 if attributes.get("transpose_a") else ranks[0] - 2, 1: None}
    if kind == "ScaledDotProductAttention":  # a query row's output needs that row of the query (and of the mask)
        if attributes.get("causal") or axis != rank - 2 or ranks[0] != rank:
            return None
        mapping: dict[int, int | None] = {n: None for n in range(len(ranks))}
        mapping[0] = ranks[0] - 2
        if len(ranks) > 3:
            mapping[3] = ranks[3] - 2 if ranks[3] >= 2 else None
        return mapping
    if kind in REDUCTIONS or kind in ("Softmax", "LogSoftmax"):
        if kind in ("Softmax", "LogSoftmax"):
            reduced = [int(attributes["axis"])]
        else:
            axes = _const(node.input_value(1)) if len(ranks) > 1 else None
            if axes is None:
                return None
            reduced = [int(a) for a in axes.ravel()]
        if any(a % ranks[0] <= axis for a in reduced):  # only axes after the rows: the rows keep their place
            return None
        return {n: (axis if n == 0 else None) for n in range(len(ranks))}
    if kind == "Transpose":
        order = _const(node.input_value(1))
        if order is None or order.size != rank:
            return None
        return {0: int(order.ravel()[axis]), 1: None}
    if kind == "Reshape":  # only one that copies every axis up to the rows (special_zero 0s): it reshapes within a row
        pattern = _const(node.input_value(1))
        if (pattern is None or not attributes.get("special_zero") or pattern.size <= axis
                or any(int(v) != 0 for v in pattern.ravel()[:axis + 1])):
            return None
        return {0: axis, 1: None}
    return None


def _row_consumer(target, axis: int, region: dict, pooling) -> bool:
    """Whether `target` (an operation's input) takes only the rows along `axis` of what feeds it: an input of the
    region with that row axis, or the pooling's data."""
    consumer = target.get_node().get_instance_id()
    if consumer == pooling.get_instance_id():
        return target.get_index() == 0 and axis == SEQUENCE_AXIS
    return consumer in region and region[consumer][2].get(target.get_index()) == axis


def pool_row_only(model) -> RowOnlyReport:
    """Rewrite `model` in place so that the row-wise operations whose results reach only a pooling Gather of one
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
        region: dict[int, tuple[object, int, dict[int, int | None]]] = {}  # id -> (node, row axis, input axes)
        conflicts: set[int] = set()
        stack = [(pooling.input_value(0).get_node(), SEQUENCE_AXIS)]
        while stack:  # every row-wise operation reachable upwards from the pooling, with the axis of its rows
            node, axis = stack.pop()
            key = node.get_instance_id()
            if key in region:
                if region[key][1] != axis:
                    conflicts.add(key)
                continue
            axes = _row_axes_at(node, axis)
            if axes is None:
                continue
            region[key] = (node, axis, axes)
            stack.extend((node.input_value(n).get_node(), a) for n, a in axes.items()
                         if a is not None and _has_parameter(node.input_value(n), seen))
        for key in conflicts:
            del region[key]
        changed = True
        while changed:  # keep only operations whose every consumer takes only their rows
            changed = False
            for key, (node, axis, _) in list(region.items()):
                if not all(_row_consumer(target, axis, region, pooling)
                           for target in node.output(0).get_target_inputs()):
                    del region[key]
                    changed = True
        if not region:
            continue
        row_index = ops.constant(np.array([row], np.int64))
        edge: dict[tuple[int, int, int], object] = {}
        for node, _, axes in region.values():  # feed the region the pooled row of everything entering it
            for n, value in enumerate(node.input_values()):
                axis = axes.get(n)
                if axis is None or value.get_node().get_instance_id() in region:
                    continue
                if _static_dim(value, axis) == 1:
                    continue  # broadcasts along the rows: the same for every row
                source_key = (value.get_node().get_instance_id(), value.get_index(), axis)
                if source_key not in edge:
                    edge[source_key] = ops.gather(value, row_index, ops.constant(np.array(axis, np.int64))).output(0)
                    gathers += 1
                node.input(n).replace_source_output(edge[source_key])
        nodes += len(region)
    if not nodes:
        return RowOnlyReport(False, reason="nothing under the pooling Gather works row by row alone")
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
