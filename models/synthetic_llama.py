"""Synthetic Llama-architecture models of any size, written layer by layer to external data.

For memory tests of large models: random weights from a config, streamed to
``<name>.onnx.data`` one tensor at a time, so writing an 8 GB model needs no more memory than
its largest tensor. The graph is a Llama decoder without a KV cache: token embedding,
``layers`` blocks of RMSNorm → grouped-query attention (query heads share key/value heads) →
residual → RMSNorm → SwiGLU MLP → residual, a final RMSNorm and an untied LM head. Rotary
embeddings and the causal mask are left out: they hold no weights, and memory behaviour is
what these models exist to measure. Weights are N(0, 0.02²) (norm gains 1), so the model runs
and its outputs are finite; they mean nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir


@dataclass(frozen=True)
class LlamaConfig:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 3
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every weight in the order it is written."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        shapes = [("embed_tokens", (self.vocab, h))]
        for i in range(self.layers):
            p = f"layers.{i}."
            shapes += [
                (p + "input_layernorm", (h,)),
                (p + "q_proj", (h, h)), (p + "k_proj", (h, kv)), (p + "v_proj", (h, kv)), (p + "o_proj", (h, h)),
                (p + "post_attention_layernorm", (h,)),
                (p + "gate_proj", (h, self.intermediate)), (p + "up_proj", (h, self.intermediate)),
                (p + "down_proj", (self.intermediate, h)),
            ]
        return shapes + [("norm", (h,)), ("lm_head", (h, self.vocab))]

    def nbytes(self) -> int:
        return sum(4 * math.prod(shape) for _, shape in self.tensor_shapes())


# About 1, 4 and 8 GB of float32 weights.
PRESETS: dict[str, LlamaConfig] = {
    "1gb": LlamaConfig(hidden=2048, intermediate=5632, layers=3, heads=16, kv_heads=4, vocab=32000),
    "2gb": LlamaConfig(hidden=2048, intermediate=5632, layers=10, heads=16, kv_heads=4, vocab=32000),
    "4gb": LlamaConfig(hidden=4096, intermediate=11008, layers=4, heads=32, kv_heads=8, vocab=32000),
    "8gb": LlamaConfig(hidden=4096, intermediate=11008, layers=10, heads=32, kv_heads=8, vocab=32000),
    "tiny": LlamaConfig(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256),
}


def write_synthetic_llama(
    path: str | Path, config: LlamaConfig, *, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Write the model to ``path`` and its weights to ``path.name + '.data'`` beside it.

    Holds one weight in memory at a time. Returns the model path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    weights: dict[str, ir.Value] = {}
    offset, total = 0, config.nbytes()
    with open(path.parent / data_name, "wb") as data:
        for name, shape in config.tensor_shapes():
            if len(shape) == 1:
                array = np.ones(shape, dtype=np.float32)
            else:
                array = rng.standard_normal(shape, dtype=np.float32)
                array *= 0.02
            data.write(array.tobytes())
            tensor = ir.ExternalTensor(data_name, offset, array.nbytes, ir.DataType.FLOAT, shape=ir.Shape(shape),
                                       name=name, base_dir=path.parent)
            weights[name] = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT),
                                     const_value=tensor)
            offset += array.nbytes
            del array
            if progress:
                progress(offset, total)
    model = _graph(config, weights)
    ir.save(model, path)  # the weights stay where they were written: references only
    return path


def _graph(c: LlamaConfig, w: dict[str, ir.Value]) -> ir.Model:
    head_dim = c.hidden // c.heads
    ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "sequence"]), type=ir.TensorType(ir.DataType.INT64))
    nodes: list[ir.Node] = []

    def op(op_type: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes)
        nodes.append(node)
        return node.outputs[0]

    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        w[name] = value
        return value

    eps, axes = const("rms_eps", np.array(1e-5, np.float32)), const("last_axis", np.array([-1], np.int64))
    scale = const("attn_scale", np.array(1 / math.sqrt(head_dim), np.float32))
    q_shape = const("q_shape", np.array([0, 0, c.heads, head_dim], np.int64))
    kv_shape = const("kv_shape", np.array([0, 0, c.kv_heads, 1, head_dim], np.int64))
    repeat = const("kv_repeat", np.array([1, 1, 1, c.heads // c.kv_heads, 1], np.int64))
    ctx_shape = const("ctx_shape", np.array([0, 0, c.hidden], np.int64))

    def rms(x: ir.Value, gain: str) -> ir.Value:
        mean = op("ReduceMean", op("Mul", x, x), axes, keepdims=1)
        return op("Mul", op("Div", x, op("Sqrt", op("Add", mean, eps))), w[gain])

    def heads(x: ir.Value, kv: bool) -> ir.Value:  # [B, S, n*d] -> [B, heads, S, d]
        if not kv:
            return op("Transpose", op("Reshape", x, q_shape), perm=[0, 2, 1, 3])
        tiled = op("Tile", op("Reshape", x, kv_shape), repeat)  # each KV head serves heads/kv_heads queries
        return op("Transpose", op("Reshape", tiled, q_shape), perm=[0, 2, 1, 3])

    x = op("Gather", w["embed_tokens"], ids, axis=0)
    for i in range(c.layers):
        p = f"layers.{i}."
        h = rms(x, p + "input_layernorm")
        q = heads(op("MatMul", h, w[p + "q_proj"]), kv=False)
        k = heads(op("MatMul", h, w[p + "k_proj"]), kv=True)
        v = heads(op("MatMul", h, w[p + "v_proj"]), kv=True)
        scores = op("Mul", op("MatMul", q, op("Transpose", k, perm=[0, 1, 3, 2])), scale)
        ctx = op("MatMul", op("Softmax", scores, axis=-1), v)
        ctx = op("Reshape", op("Transpose", ctx, perm=[0, 2, 1, 3]), ctx_shape)
        x = op("Add", x, op("MatMul", ctx, w[p + "o_proj"]))
        h = rms(x, p + "post_attention_layernorm")
        gate = op("MatMul", h, w[p + "gate_proj"])
        up = op("MatMul", h, w[p + "up_proj"])
        x = op("Add", x, op("MatMul", op("Mul", op("Mul", gate, op("Sigmoid", gate)), up), w[p + "down_proj"]))
    logits = op("MatMul", rms(x, "norm"), w["lm_head"])
    logits.name = "logits"
    logits.shape = ir.Shape(["batch", "sequence", c.vocab])
    logits.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([ids], [logits], nodes=nodes, initializers=list(w.values()), opset_imports={"": 18},
                     name="synthetic_llama")
    model = ir.Model(graph, ir_version=9, producer_name="graphc.synthetic_llama")
    model.metadata_props.update({
        "graphc.arch.model_type": "llama", "graphc.arch.num_layers": str(c.layers),
        "graphc.arch.num_heads": str(c.heads), "graphc.arch.num_kv_heads": str(c.kv_heads),
        "graphc.arch.head_dim": str(head_dim), "graphc.arch.hidden_size": str(c.hidden),
        "graphc.arch.intermediate_size": str(c.intermediate), "graphc.arch.vocab_size": str(c.vocab),
    })
    return model
