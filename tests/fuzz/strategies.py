"""Hypothesis strategies for random transformer-like ONNX graphs, built with onnx.helper.

A :class:`Spec` is drawn first (sizes, opset, dtype, exporter shape, norm, activation, mask,
...), then :func:`build` turns it into a checked ``onnx.ModelProto``. Every drawn graph is
valid ONNX that ONNX Runtime's CPU provider runs (``test_generated_graphs_are_valid`` keeps
it so); what a pass does to it is the property under test.

Two "exporter shapes" mirror what graphc meets in practice:

- ``dynamo``: MatMul on pre-transposed ``[in, out]`` weights, ``node_Op_N``/``val_N`` names,
  constants as initializers, the dynamo exporter's ``pkg.torch.onnx.name_scopes`` node
  metadata (what ``compact-metadata`` rewrites), masks built with ``Where``.
- ``legacy``: ``Gemm(transB=1)`` on flattened 2-D activations or a ``Transpose`` of an
  ``[out, in]`` weight before MatMul, ``/model/layers.N/...`` node names, ``Constant`` nodes
  for shapes and axes, masks as ``(1 - mask) * min``.

Ops that exist only from some opset are used only there: ``Gelu`` from 20,
``RMSNormalization`` from 23; ``ReduceMean`` takes its axes as an attribute before 18 and
as an input from 18. ``LayerNormalization`` exists from 17, the lowest opset drawn.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSETS = tuple(range(17, 24))  # the supported (tested) range, see docs/supported-models.md
DTYPES = ("float32", "float16")
MAX_POSITIONS = 32  # >= graphc.checks.validate.SYNTH_SEQ


@dataclass(frozen=True)
class Spec:
    hidden: int = 16
    heads: int = 2
    layers: int = 1
    ffn_mult: int = 2
    vocab: int = 100
    opset: int = 17
    dtype: str = "float32"
    style: str = "dynamo"  # "dynamo" | "legacy"
    linear: str = "matmul"  # "matmul" | "matmul_t" | "gemm"
    bias: bool = True
    norm: str = "layernorm_op"  # layernorm_op | layernorm_decomposed | rmsnorm_decomposed | rmsnorm_op
    prenorm: bool = False
    act: str = "gelu_erf"  # gelu_erf | gelu_tanh | gelu_op | relu | silu | swiglu
    mask: str = "padding"  # none | padding | causal | both
    positions: str = "range"  # none | range | slice
    token_types: bool = True
    scale: str = "div_scores"  # div_scores | mul_scores | mul_qk
    reshape: str = "const"  # const | dynamic
    lm_head: bool = False
    tied: bool = False  # the LM head reads the word-embedding table through a Transpose (not drawn by specs())
    outliers: bool = False  # a few LayerNorm/RMSNorm gains 10-20x the rest (as in real BERTs)
    seed: int = 0

    def short(self) -> str:
        return ",".join(f"{k}={v}" for k, v in asdict(self).items() if v != getattr(Spec, k))


@st.composite
def specs(draw, *, dtypes=DTYPES, opsets=OPSETS, styles=("dynamo", "legacy")) -> Spec:
    hidden = draw(st.sampled_from((8, 16, 32)))
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if hidden % h == 0]))
    opset = draw(st.sampled_from(opsets))
    style = draw(st.sampled_from(styles))
    linear = "matmul" if style == "dynamo" else draw(st.sampled_from(("matmul_t", "gemm")))
    norms = ["layernorm_op", "layernorm_decomposed", "rmsnorm_decomposed"] + (["rmsnorm_op"] if opset >= 23 else [])
    acts = ["gelu_erf", "gelu_tanh", "relu", "silu", "swiglu"] + (["gelu_op"] if opset >= 20 else [])
    return Spec(
        hidden=hidden,
        heads=heads,
        layers=draw(st.integers(1, 2)),
        ffn_mult=draw(st.sampled_from((2, 4))),
        vocab=draw(st.sampled_from((40, 100))),
        opset=opset,
        dtype=draw(st.sampled_from(dtypes)),
        style=style,
        linear=linear,
        bias=draw(st.booleans()),
        norm=draw(st.sampled_from(norms)),
        prenorm=draw(st.booleans()),
        act=draw(st.sampled_from(acts)),
        mask=draw(st.sampled_from(("none", "padding", "padding", "causal", "both"))),
        positions=draw(st.sampled_from(("none", "range", "slice"))),
        token_types=draw(st.booleans()),
        scale=draw(st.sampled_from(("div_scores", "mul_scores", "mul_qk"))),
        reshape=draw(st.sampled_from(("const", "dynamic"))),
        lm_head=draw(st.booleans()),
        outliers=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def bert_like(**kw) -> Spec:
    """The shape of a BERT encoder (post-norm, LayerNorm, GELU, padding mask)."""
    return replace(Spec(hidden=32, heads=4, layers=2, norm="layernorm_op", act="gelu_erf", mask="padding"), **kw)


def llama_like(**kw) -> Spec:
    """The shape of a Llama decoder (pre-norm, RMSNorm, SwiGLU, causal + padding mask, no biases)."""
    base = Spec(
        hidden=32, heads=4, layers=2, norm="rmsnorm_decomposed", prenorm=True, act="swiglu", mask="both",
        positions="none", token_types=False, bias=False, lm_head=True,
    )
    return replace(base, **kw)


# --------------------------------------------------------------------------- building


class _Builder:
    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.np_dtype = np.float16 if spec.dtype == "float16" else np.float32
        self.elem = TensorProto.FLOAT16 if spec.dtype == "float16" else TensorProto.FLOAT
        self.legacy = spec.style == "legacy"
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0
        self.scope = "model"

    # names ------------------------------------------------------------------------
    def _next(self) -> int:
        self.count += 1
        return self.count

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, tag: str = "", **attrs) -> str | list[str]:
        i = self._next()
        if self.legacy:
            name = "/" + "/".join([*_module_path(self.scope), *([tag] if tag else []), f"{op_type}_{i}"])
            outs = [f"{name}_output_{k}" for k in range(n_out)]
        else:
            name = f"node_{tag or op_type}_{i}"
            outs = [f"val_{i}" if k == 0 else f"val_{i}_{k}" for k in range(n_out)]
        node = helper.make_node(op_type, inputs, outs, name=name, **attrs)
        if not self.legacy:
            scopes = ["", *_prefixes(self.scope), f"{op_type.lower()}_{i}"]
            helper.set_metadata_props(node, {"pkg.torch.onnx.name_scopes": repr(scopes), "namespace": self.scope})
        self.nodes.append(node)
        return outs[0] if n_out == 1 else outs

    def init(self, array: np.ndarray, name: str) -> str:
        if any(t.name == name for t in self.inits):
            name = f"{name}_{self._next()}"
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values) -> str:
        array = np.asarray(values, dtype=np.int64)
        if self.legacy:
            i = self._next()
            out = "/" + "/".join(_module_path(self.scope)) + f"/Constant_{i}_output_0"
            self.nodes.append(helper.make_node("Constant", [], [out], name=f"Constant_{i}", value=numpy_helper.from_array(array)))
            return out
        return self.init(array, f"val_{self._next()}")

    def scalar(self, value: float) -> str:
        return self.init(np.array(value, dtype=self.np_dtype), f"const_{self._next()}")

    def param(self, shape: tuple[int, ...], std: float, name: str, mean: float = 0.0) -> str:
        array = (mean + std * self.rng.standard_normal(shape)).astype(np.float32)
        return self.init(array.astype(self.np_dtype), name)

    # building blocks ----------------------------------------------------------------
    def linear(self, x: str, d_in: int, d_out: int, what: str) -> str:
        s = self.spec
        std = 1.0 / math.sqrt(d_in)
        bias = self.param((d_out,), 0.1, f"{self.scope}.{what}.bias") if s.bias else None
        if s.linear == "gemm":
            flat = self.op("Reshape", [x, self.ints([-1, d_in])], tag=what)
            w = self.param((d_out, d_in), std, f"{self.scope}.{what}.weight")
            y2 = self.op("Gemm", [flat, w, *([bias] if bias else [])], tag=what, transB=1)
            lead = self.op("Shape", [x], tag=what, start=0, end=2)
            shape = self.op("Concat", [lead, self.ints([d_out])], tag=what, axis=0)
            return self.op("Reshape", [y2, shape], tag=what)
        if s.linear == "matmul_t":
            w = self.param((d_out, d_in), std, f"{self.scope}.{what}.weight")
            wt = self.op("Transpose", [w], tag=what, perm=[1, 0])
            y = self.op("MatMul", [x, wt], tag=what)
        else:
            w = self.param((d_in, d_out), std, f"val_{self._next()}")
            y = self.op("MatMul", [x, w], tag=what)
        return self.op("Add", [y, bias], tag=what) if bias else y

    def reduce_mean(self, x: str) -> str:
        if self.spec.opset >= 18:
            extra = {} if self.legacy else {"noop_with_empty_axes": 0}  # as torch's dynamo writes it
            return self.op("ReduceMean", [x, self.ints([-1])], keepdims=1, **extra)
        return self.op("ReduceMean", [x], axes=[-1], keepdims=1)

    def norm(self, x: str, what: str) -> str:
        s, h = self.spec, self.spec.hidden
        gain = (1.0 + 0.1 * self.rng.standard_normal(h)).astype(np.float32)
        if s.outliers:
            gain[self.rng.choice(h, size=2, replace=False)] *= self.rng.uniform(10, 20)
        gamma = self.init(gain.astype(self.np_dtype), f"{self.scope}.{what}.weight")
        eps = 1e-5
        if s.norm == "layernorm_op":
            beta = self.param((h,), 0.1, f"{self.scope}.{what}.bias")
            return self.op("LayerNormalization", [x, gamma, beta], tag=what, axis=-1, epsilon=eps)
        if s.norm == "rmsnorm_op":
            return self.op("RMSNormalization", [x, gamma], tag=what, axis=-1, epsilon=eps)
        if s.norm == "layernorm_decomposed":
            beta = self.param((h,), 0.1, f"{self.scope}.{what}.bias")
            mean = self.reduce_mean(x)
            centered = self.op("Sub", [x, mean])
            var = self.reduce_mean(self.op("Pow", [centered, self.scalar(2.0)]))
            std = self.op("Sqrt", [self.op("Add", [var, self.scalar(eps)])])
            normed = self.op("Div", [centered, std])
            return self.op("Add", [self.op("Mul", [normed, gamma]), beta])
        # rmsnorm_decomposed (Llama's: x * rsqrt(mean(x^2) + eps) * weight)
        ms = self.reduce_mean(self.op("Pow", [x, self.scalar(2.0)]))
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, self.scalar(eps)])])])
        return self.op("Mul", [gamma, self.op("Mul", [x, inv])])

    def split_heads(self, x: str, shape: str | None) -> str:
        s = self.spec
        d = s.hidden // s.heads
        target = self.ints([0, 0, s.heads, d]) if shape is None else shape
        return self.op("Transpose", [self.op("Reshape", [x, target])], perm=[0, 2, 1, 3])

    def attention(self, x: str, mask_bias: str | None) -> str:
        s = self.spec
        h, d = s.hidden, s.hidden // s.heads
        outer = self.scope
        self.scope = f"{outer}.self_attn"
        heads_shape = None
        merge_shape = self.ints([0, 0, h])
        if s.reshape == "dynamic":
            lead = self.op("Shape", [x], start=0, end=2)
            heads_shape = self.op("Concat", [lead, self.ints([s.heads, d])], axis=0)
            merge_shape = self.op("Concat", [lead, self.ints([h])], axis=0)
        q = self.split_heads(self.linear(x, h, h, "q_proj"), heads_shape)
        k = self.split_heads(self.linear(x, h, h, "k_proj"), heads_shape)
        v = self.split_heads(self.linear(x, h, h, "v_proj"), heads_shape)
        kt = self.op("Transpose", [k], perm=[0, 1, 3, 2])
        if s.scale == "mul_qk":
            root = self.scalar(d**-0.25)
            scores = self.op("MatMul", [self.op("Mul", [q, root]), self.op("Mul", [kt, root])])
        else:
            scores = self.op("MatMul", [q, kt])
            if s.scale == "div_scores":
                scores = self.op("Div", [scores, self.scalar(math.sqrt(d))])
            else:
                scores = self.op("Mul", [scores, self.scalar(1.0 / math.sqrt(d))])
        if mask_bias is not None:
            scores = self.op("Add", [scores, mask_bias])
        probs = self.op("Softmax", [scores], axis=-1)
        ctx = self.op("MatMul", [probs, v])
        merged = self.op("Reshape", [self.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge_shape])
        out = self.linear(merged, h, h, "o_proj")
        self.scope = outer
        return out

    def act(self, x: str) -> str:
        a = self.spec.act
        if a == "gelu_op":
            return self.op("Gelu", [x])
        if a == "gelu_erf":
            erf = self.op("Erf", [self.op("Div", [x, self.scalar(math.sqrt(2.0))])])
            return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, self.scalar(1.0)])]), self.scalar(0.5)])
        if a == "gelu_tanh":
            cube = self.op("Pow", [x, self.scalar(3.0)])
            inner = self.op("Add", [x, self.op("Mul", [cube, self.scalar(0.044715)])])
            t = self.op("Tanh", [self.op("Mul", [inner, self.scalar(math.sqrt(2.0 / math.pi))])])
            return self.op("Mul", [self.op("Mul", [x, self.scalar(0.5)]), self.op("Add", [t, self.scalar(1.0)])])
        if a == "relu":
            return self.op("Relu", [x])
        return self.op("Mul", [x, self.op("Sigmoid", [x])])  # silu (swiglu's gate too)

    def ffn(self, x: str) -> str:
        s = self.spec
        h, f = s.hidden, s.hidden * s.ffn_mult
        outer = self.scope
        self.scope = f"{outer}.mlp"
        if s.act == "swiglu":
            gate = self.act(self.linear(x, h, f, "gate_proj"))
            inner = self.op("Mul", [gate, self.linear(x, h, f, "up_proj")])
        else:
            inner = self.act(self.linear(x, h, f, "fc1"))
        out = self.linear(inner, f, h, "fc2" if s.act != "swiglu" else "down_proj")
        self.scope = outer
        return out

    def mask_bias(self, ids: str) -> tuple[str | None, list[onnx.ValueInfoProto]]:
        s = self.spec
        if s.mask == "none":
            return None, []
        neg = float(np.finfo(self.np_dtype).min)
        bias = None
        inputs = []
        if s.mask in ("padding", "both"):
            inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]))
            m4 = self.op("Unsqueeze", ["attention_mask", self.ints([1, 2])])
            if self.legacy:
                mf = self.op("Cast", [m4], to=self.elem)
                bias = self.op("Mul", [self.op("Sub", [self.scalar(1.0), mf]), self.scalar(neg)])
            else:
                keep = self.op("Cast", [m4], to=TensorProto.BOOL)
                bias = self.op("Where", [keep, self.scalar(0.0), self.scalar(neg)])
        if s.mask in ("causal", "both"):
            seq = self.op("Shape", [ids], start=1, end=2)
            pos = self.op("Range", [self.ints(0), self.op("Squeeze", [seq, self.ints([0])]), self.ints(1)])
            rows = self.op("Unsqueeze", [pos, self.ints([1])])
            cols = self.op("Unsqueeze", [pos, self.ints([0])])
            causal = self.op("Where", [self.op("LessOrEqual", [cols, rows]), self.scalar(0.0), self.scalar(neg)])
            # adding two minimums would overflow to -inf; take the smaller instead
            bias = causal if bias is None else self.op("Min", [bias, causal])
        return bias, inputs

    def embeddings(self, ids: str) -> tuple[str, list[onnx.ValueInfoProto]]:
        s = self.spec
        inputs = []
        self.scope = "model.embeddings"
        table = self.param((s.vocab, s.hidden), 1.0, "model.embeddings.word_embeddings.weight")
        x = self.op("Gather", [table, ids], tag="word_embeddings", axis=0)
        if s.token_types:
            inputs.append(helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "sequence"]))
            types = self.param((2, s.hidden), 0.5, "model.embeddings.token_type_embeddings.weight")
            x = self.op("Add", [x, self.op("Gather", [types, "token_type_ids"], tag="token_type_embeddings", axis=0)])
        if s.positions != "none":
            table = self.param((MAX_POSITIONS, s.hidden), 0.5, "model.embeddings.position_embeddings.weight")
            seq = self.op("Shape", [ids], start=1, end=2)
            if s.positions == "range":
                pos = self.op("Range", [self.ints(0), self.op("Squeeze", [seq, self.ints([0])]), self.ints(1)])
                emb = self.op("Gather", [table, pos], tag="position_embeddings", axis=0)
            else:
                emb = self.op("Slice", [table, self.ints([0]), seq, self.ints([0])], tag="position_embeddings")
            x = self.op("Add", [x, emb])
        if not s.prenorm:
            x = self.norm(x, "LayerNorm")
        return x, inputs


def _module_path(scope: str) -> list[str]:
    """"model.layers.0.self_attn" -> ["model", "layers.0", "self_attn"] (legacy node names)."""
    return re.split(r"\.(?!\d)", scope)


def _prefixes(scope: str) -> list[str]:
    parts = scope.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def build(spec: Spec, *, ir_version: int | None = None, check: bool = True) -> onnx.ModelProto:
    """The graph a spec describes, as a checked ModelProto (IR version: the lowest that the
    opset needs unless given)."""
    b = _Builder(spec)
    ids = "input_ids"
    inputs = [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "sequence"])]
    x, more = b.embeddings(ids)
    inputs += more
    b.scope = "model"
    bias, more = b.mask_bias(ids)
    inputs += more
    for layer in range(spec.layers):
        b.scope = f"model.layers.{layer}"
        if spec.prenorm:
            x = b.op("Add", [x, b.attention(b.norm(x, "input_layernorm"), bias)])
            x = b.op("Add", [x, b.ffn(b.norm(x, "post_attention_layernorm"))])
        else:
            x = b.norm(b.op("Add", [x, b.attention(x, bias)]), "attention_layernorm")
            x = b.norm(b.op("Add", [x, b.ffn(x)]), "output_layernorm")
    b.scope = "model"
    if spec.prenorm:
        x = b.norm(x, "norm")
    out_name, width = "last_hidden_state", spec.hidden
    if spec.lm_head:
        b.scope = "lm_head"
        if spec.tied:
            table = "model.embeddings.word_embeddings.weight"
            x = b.op("MatMul", [x, b.op("Transpose", [table], tag="lm_head", perm=[1, 0])], tag="lm_head")
        else:
            x = b.linear(x, spec.hidden, spec.vocab, "lm_head")
        out_name, width = "logits", spec.vocab
    b.nodes.append(helper.make_node("Identity", [x], [out_name], name="output"))
    inputs.sort(key=lambda v: ["input_ids", "attention_mask", "token_type_ids"].index(v.name))
    graph = helper.make_graph(
        b.nodes, "fuzz", inputs, [helper.make_tensor_value_info(out_name, b.elem, ["batch", "sequence", width])], b.inits
    )
    opsets = [helper.make_opsetid("", spec.opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version or helper.find_min_ir_version_for(opsets))
    model.producer_name = "graphc-fuzz" if spec.style == "dynamo" else "pytorch"
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model
