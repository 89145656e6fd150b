"""Per pass: which graphs to draw, with which options, and how many must be transformed.

A fuzz run where a pass skips every example proves nothing about the pass. So each pass
gets a plan:

- ``spec``: Spec fields fixed for this pass, so that the drawn graphs are ones the pass
  applies to (pruning needs constant-weight projections and a readable head size, the
  mask-index rewrite needs a padding mask, ...);
- ``prepared``: True when the pass acts only after the passes before it in the recipe
  (``harness.PREPARE``), None when drawn either way;
- ``options``: options that make the pass act on graphs this small, when its defaults are
  no-ops (pruning and the planner do nothing without a request; table passes skip tables
  under 256 or 1024 rows, and every drawn vocabulary has 40 or 100);
- ``tol``: the tolerance under those options, when they make a lossless-by-default pass
  lossy (otherwise ``harness.TOLERANCES``);
- ``min_transformed``: the share of examples that must come out modified (about half the
  share measured with ``EXAMPLES`` = 30, so that a pass that regresses to "skip everything"
  fails while a different draw does not).

Passes that claim float32 only (``GraphcPass.dtypes``) draw float32 graphs;
``test_float32_passes_leave_float16_models_alone`` checks them on float16 graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hypothesis import strategies as st

from graphc.core.registry import get_pass
from tests.fuzz.harness import Tol
from tests.fuzz.strategies import specs

# MatMul on [in, out] weights with a [.., heads, head_dim] reshape: the shape the structured
# passes read (a Gemm/Transpose projection or a dynamic reshape hides it; their own tests
# cover those exports)
READABLE_ATTENTION = {"style": "dynamo", "linear": "matmul", "reshape": "const", "heads": 4, "hidden": 32}


@dataclass(frozen=True)
class Plan:
    spec: dict = field(default_factory=dict)
    prepared: bool | None = None
    options: dict | None = None
    tol: Tol | None = None
    min_transformed: float = 0.0
    why: str = ""
    may_refuse: bool = False  # options under which a refusal is the pass's documented answer
    share: float = 1.0  # of the examples other passes get (a slow pass gets fewer)


PLANS: dict[str, Plan] = {
    # lossless, act on (nearly) every exported graph: measured 30/30 (cse 24/30)
    "compact-metadata": Plan(min_transformed=0.8),
    "shape-inference": Plan(min_transformed=0.8),
    "fuse-ort": Plan(min_transformed=0.8),
    "cse": Plan(min_transformed=0.4),
    # acts only where an export left dead nodes: 19/30 in one draw, 2/30 in another
    "remove-unused": Plan(min_transformed=0.05),
    "fold-constants": Plan(min_transformed=0.3),
    # trim-outputs acts where fuse-ort left unused extra outputs: 7/30
    "trim-outputs": Plan(min_transformed=0.1),
    # mask_index needs a fused attention with a padding mask: 20/20 with this plan (1/30 drawn freely)
    "attention-mask-index": Plan(spec={"mask": "padding"}, prepared=True, min_transformed=0.5),
    "remove-padding": Plan(spec={"mask": "padding"}, prepared=True, min_transformed=0.4),
    # acts on the skip norms fuse-ort makes (with a bias, or RMS): SPLIT_MEASURED
    # acts on the skip norms fuse-ort makes (a LayerNorm's with a bias; an RMSNorm's with
    # simplified=true): 10/30 with RMSNorm pre-norm graphs (3/30 drawn freely)
    "split-skip-norm": Plan(spec={"norm": "rmsnorm_decomposed", "prenorm": True}, prepared=True,
                            options={"simplified": True}, min_transformed=0.15),
    # AWQ scales fold into a pre-norm's gain: 12/20 with RMSNorm pre-norm graphs (2/30 drawn freely)
    "awq-scale": Plan(spec={"norm": "rmsnorm_decomposed", "prenorm": True}, min_transformed=0.3),
    # quantization: measured 27/30 (int8), 30/30 (nbits, activations)
    "quantize-int8": Plan(min_transformed=0.5),
    "quantize-nbits": Plan(min_transformed=0.5),
    # every target, within an error budget: static per-tensor grids on many tensors of a small
    # graph with outlier channels have no accuracy bound of their own (drawn at hidden 8 and 32
    # with outliers: output cosine 0.949 and 0.954 with every target, or with the int8-static
    # recipe's options); max_error gives up the costliest targets until the measured error fits
    # half the examples: each runs its budget's trials (16 synthesized feeds a trial), ~1.8 s an
    # example on a 2-core AVX2 EPYC, the longest fuzz test of `make test` at 20
    "quantize-activations": Plan(options={"max_error": 0.005}, min_transformed=0.5, share=0.5),
    # tables of at least 64 rows (min_rows): the 100-word vocabulary, 30/30 (7/30 to 17/30
    # when the 40-word one is drawn too)
    "quantize-embedding": Plan(spec={"vocab": 100}, min_transformed=0.5),
    "quantize-gather-block": Plan(spec={"vocab": 100}, min_transformed=0.5),
    "mixed-precision": Plan(min_transformed=0.4),
    "fp16-constants": Plan(min_transformed=0.4),
    # compact-scales works on quantize-nbits' block scales; defaults skip tensors of under 64
    # scales (all of these graphs): 20/20 with min_elements=4
    "compact-scales": Plan(prepared=True, options={"min_elements": 4}, min_transformed=0.5),
    # pack-nbits packs MatMulNBits that read one input (Q/K/V of a drawn attention)
    "pack-nbits": Plan(prepared=True, min_transformed=0.5),
    # structured pruning acts only when asked: one head of four, a quarter of the FFN
    # neurons (least-squares corrected). On random weights every head matters alike: measured
    # worst output cosine 0.515 (heads) and 0.969 (FFN) over 20 graphs; a wrong slice or a
    # broken layout gives an invalid model or a cosine near 0. Accuracy on real exports:
    # tests/passes/test_prune_heads.py, test_prune_ffn.py
    "prune-heads": Plan(spec=READABLE_ATTENTION, options={"fraction": 0.25}, tol=Tol(cos=0.4),
                        min_transformed=0.5),
    "prune-ffn": Plan(spec={"style": "dynamo", "linear": "matmul"}, options={"fraction": 0.25},
                      tol=Tol(cos=0.9), min_transformed=0.5),
    # the planner with an error budget (one measuring round, 2 calibration feeds, 12 examples
    # of 30: it measures candidates with ORT, ~3 s a graph):
    # 15/16 transformed, one refused as over budget ("budget missed after 1 plan rounds", its
    # documented answer); measured worst output cosine 0.924 on other feeds than it planned on
    "plan": Plan(spec=READABLE_ATTENTION, options={"max_error": 0.02, "feeds": 2, "rounds": 1},
                 tol=Tol(cos=0.85), min_transformed=0.4, may_refuse=True, share=0.4),
    # factorizing random (flat-spectrum) tables needs a loose error budget: relative error 0.3
    # per table; 3/12 transformed, measured worst output cosine 0.768
    "lowrank-embedding": Plan(options={"min_rows": 32, "max_error": 0.3, "min_saving": 0.0},
                              tol=Tol(cos=0.7), min_transformed=0.1),
    # random weights have flat spectra: with the default 5% error budget per layer only layers
    # behind outlier gains factorize (1/30). With 20% per layer (and small layers allowed):
    # 15/16 transformed, measured worst output cosine 0.863 (errors compound over layers)
    "svd-linear": Plan(options={"min_elements": 64, "max_error": 0.2, "min_saving": 0.0}, tol=Tol(cos=0.8),
                       min_transformed=0.5),
    # needs a tied embedding / LM head (Gather + MatMul through a Transpose of one table) and
    # tables of at least min_rows (default 1024; drawn vocabularies have 40 or 100 rows):
    # 16/16 transformed, exact (cosine 1.0)
    "split-vocab": Plan(spec={"lm_head": True, "tied": True}, options={"min_rows": 32}, min_transformed=0.5),
    # joins split-vocab's tiers (marked by it) that the plan gave one precision: no drawn graph
    # holds them; the rewrite is covered by tests/passes/test_merge_tiers.py
    "merge-tiers": Plan(min_transformed=0.0, why="acts only on split-vocab's tiers, which no drawn graph holds"),
    # needs separate Q, K, V MatMuls and a bias into a fused attention: the drawn graphs fuse to
    # MultiHeadAttention without them; covered on the real tiny BERT export
    "quantize-attention": Plan(prepared=True, min_transformed=0.0,
                               why="no drawn graph fuses to an attention with separate Q, K, V and a bias"),
    # the drawn transformers hold no convolution: these must leave them alone, unbroken; their
    # rewrites are covered by tests/passes/test_quantize_conv.py and the Paddle-style graphs of
    # tests/third_party_graphs.py
    "fold-batchnorm": Plan(min_transformed=0.0, why="no drawn graph has a Conv followed by BatchNormalization"),
    "quantize-conv": Plan(min_transformed=0.0, why="no drawn graph has a Conv or ConvTranspose"),
    # likewise recurrent layers: tests/passes/test_quantize_lstm.py and tests/third_party_graphs.lstm
    "quantize-lstm": Plan(min_transformed=0.0, why="no drawn graph has an LSTM"),
    "quantize-rnn-weights": Plan(min_transformed=0.0, why="no drawn graph has a recurrent layer"),
    # exact rewrites of forms the drawn graphs do not hold (separate Q/K/V, one table per head):
    # tests/passes/test_tie_head.py, tests/test_builder_input.py (the model builder's packed Q/K/V
    # and second table copy) and the Phi-3 export (packed qkv_proj, gate_up_proj) cover them
    "tie-head": Plan(min_transformed=0.0, why="no drawn graph stores its LM head as a copy of the table"),
    "split-packed": Plan(min_transformed=0.0, why="no drawn graph packs projections into one MatMul"),
    # graphs whose projections are Gemm (legacy exports)
    "gemm-to-matmul": Plan(spec={"style": "legacy", "linear": "gemm"}, min_transformed=0.5),
}


def plan_for(name: str) -> Plan:
    return PLANS.get(name, Plan())


def float32_only(name: str) -> bool:
    return "float16" not in getattr(get_pass(name), "dtypes", ("float32",))


def specs_for(name: str):
    """The drawn graphs for this pass: its plan's fixed fields, float32 for float32-only passes."""
    plan = plan_for(name)
    base = specs(dtypes=("float32",)) if float32_only(name) else specs()
    if not plan.spec:
        return base
    fixed = dict(plan.spec)

    def fix(spec):
        out = replace(spec, **fixed)
        if out.hidden % out.heads:  # keep the spec consistent
            out = replace(out, heads=1)
        return out

    return base.map(fix)


def prepared_for(name: str, prepare_names) -> st.SearchStrategy[bool]:
    plan = plan_for(name)
    if name not in prepare_names:
        return st.just(False)
    return st.just(plan.prepared) if plan.prepared is not None else st.booleans()
