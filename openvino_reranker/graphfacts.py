"""What an IR's graph stores, read without changing it: whether it quantizes activations (FakeQuantize or
FakeConvert: a calibrated full-INT8 IR), what each MatMul's weight is stored as (low precision or float), and so
whether the IR is weight-only compressed. `quantize` reports these and refuses an IR that is quantized already;
the parity guard serves a weight-only compressed IR on one compile by default (`parity.replicas_for`).
"""

from __future__ import annotations

QUANTIZED_OPS = ("FakeQuantize", "FakeConvert")
LOW_PRECISION_TYPES = ("i8", "u8", "i4", "u4", "f8e4m3", "f8e5m2", "nf4")


def is_quantized(model) -> bool:
    """Whether the graph already quantizes activations (FakeQuantize or FakeConvert)."""
    return any(op.get_type_name() in QUANTIZED_OPS for op in model.get_ops())


PASS_THROUGH = ("Convert", "Multiply", "Subtract", "Reshape", "Transpose", "Unsqueeze", "Squeeze")


def weight_source(node):
    """The Constant a MatMul's weight input comes from (through its decompression: Convert, Subtract, Multiply,
    Reshape, Transpose), or None when the input is computed (an activation)."""
    for _ in range(8):
        kind = node.get_type_name()
        if kind == "Constant":
            return node
        if kind == "FakeQuantize":
            node = node.input_value(0).get_node()
            continue
        if kind not in PASS_THROUGH:
            return None
        inputs = [node.input_value(i).get_node() for i in range(node.get_input_size())]
        computed = [n for n in inputs if n.get_type_name() != "Constant"]
        if len(computed) > 1:
            return None
        node = computed[0] if computed else inputs[0]
    return None


def matmul_summary(model) -> dict[str, int]:
    """MatMuls by what they multiply: `weights_low_precision` (a weight stored in a low-precision type, INT8 here),
    `weights_float`, and `activations_quantized` (every computed input comes through a FakeQuantize or
    FakeConvert)."""
    summary = {"matmuls": 0, "weights_low_precision": 0, "weights_float": 0, "activations_quantized": 0}
    for op in model.get_ops():
        if op.get_type_name() != "MatMul":
            continue
        summary["matmuls"] += 1
        quantized_inputs = True
        for i in range(2):
            source = op.input_value(i).get_node()
            constant = weight_source(source)
            if constant is not None:
                low = constant.get_element_type().get_type_name() in LOW_PRECISION_TYPES
                summary["weights_low_precision" if low else "weights_float"] += 1
            else:
                quantized_inputs &= comes_through_quantizer(source)
        summary["activations_quantized"] += quantized_inputs
    return summary


def comes_through_quantizer(node) -> bool:
    """Whether a computed input reaches its consumer through a FakeQuantize or FakeConvert (possibly reshaped)."""
    for _ in range(4):
        if node.get_type_name() in QUANTIZED_OPS:
            return True
        if node.get_type_name() not in ("Reshape", "Transpose", "Convert"):
            return False
        node = node.input_value(0).get_node()
    return False


def weights_only_compressed(model) -> bool:
    """Whether `model` stores MatMul weights in a low-precision type (decompressed at run time) without quantizing
    activations: a weight-only IR (`optimum-cli --weight-format int8`), not a calibrated full-INT8 one (`quantize`).
    False for a test's stand-in that is not an OpenVINO model."""
    import openvino as ov

    if not isinstance(model, ov.Model):
        return False
    return not is_quantized(model) and matmul_summary(model)["weights_low_precision"] > 0
