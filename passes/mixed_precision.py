"""Mixed precision from measured sensitivity: bits and block size per layer, to a budget.

For every weight that ``quantize-nbits`` (constant MatMul B) or ``quantize-gather-block``
(embedding table) would quantize, the output error with *only that layer* quantized is
measured on the calibration feeds (``_sensitivity``: mean 1 - cosine of the output rows, one
ONNX Runtime session with the weights as inputs). The candidates are every ``bits`` x
``block_sizes`` pair (a block size that only adds padding over a smaller one with the same
bits is dropped). Measuring each is one run per candidate (``measure_all``); by default each
layer is measured at ``probe_bits`` x ``probe_block`` (int4/b32: one run a layer) and every
other candidate is predicted from the probe of the nearest bit width by the ratio of their
squared relative weight errors (output error is quadratic in a small weight error: on MiniLM
the measured int2/int4 output-error ratios were 25-33, the squared weight-error ratio ~25).
The bytes of each candidate are exact (the passes' storage layout).

A planner (``_plan.precision``) then picks one candidate per layer to meet the budget:

- ``max_bits``: average stored bits per planned weight (codes, scales, zero points), e.g.
  4.0; portable across models;
- ``max_bytes``: the whole model's bytes: the planned weights plus every other initializer at
  its current size (an upper bound when ``fp16-constants`` runs later);
- ``size_like = "rtn4-b128"``: the whole model's bytes (as ``max_bytes``) that ONNX Runtime's
  default 4-bit quantizer (``MatMulNBitsQuantizer``: round to nearest, 4 bits, blocks of 128,
  symmetric, scales in the weight's float type, MatMul and Gather) gives this model: every
  planned weight laid out as that quantizer stores it (``_size_like``; on SmolLM2-135M within
  0.05% of its file), a table both looked up and read as the LM head twice (it stores each use),
  the other initializers as they are, less 0.5% of the planned weights' bytes for what graphc's
  graph adds (block-scale decoders, a split head's map: ~0.4 MB on SmolLM2-135M). A budget from
  the model itself, so that one recipe fits every decoder and is not larger than the 4-bit
  model users compare with (weights too small for the plan's blocks stay float and count as
  they are: on toy models the result can then be larger);
- ``size_like = "genai-int4"``: the same from onnxruntime-genai's model builder's ``-p int4 -e cpu``
  layout: every MatMul as MatMulNBits, 4 bits, blocks of 32, symmetric, scales in the weight's
  float type; a table tied to the LM head stored once (the lookup reads the head's codes), an
  untied lookup table left float: a genai folder no larger than the builder's int4 folder of
  the same model (``tests/test_builder_input.py`` checks the layout to the byte against the
  builder's own folder);
- ``max_error``: predicted output error (mean 1 - cosine of output rows, the sum of the
  layers' errors: 0.01 is a cosine of about 0.99); alone it buys the fewest bytes that meet it,
  with a size budget it is checked.

``metric="kl"`` measures a language model's error as the mean KL divergence (nats) of each
token's next-token distribution from the original's instead of the logits' cosine: to first
order the rise of log-perplexity, so ``max_error=0.049`` is about a 5% perplexity rise. (On
SmolLM2 the logits' cosine ranks the tied LM head far below the FFNs while the head alone at
int4 costs ~10% perplexity, the most of any weight.)

A table tied to an LM head (``Gather(table)`` and ``MatMul(x, Transpose(table))``) is one
layer: its precision goes on the head, and ``quantize-gather-block`` reads the head's
``MatMulNBits`` weights, so only blocks that divide the hidden size are candidates.

With ``siblings = true`` the MatMuls that read one input (a block's Q, K and V; a gated MLP's
gate and up: ``_siblings``) are one layer: one probe with all of them quantized (their rows
stacked: each row is quantized on its own, GPTQ's too, so the probe is exactly the members
quantized apart and replaced together), one choice of bits and block size, bytes and weight
errors summed. That saves probes (SmolLM2-135M: 126 instead of 216, the probe phase 190 s instead
of ~320 s) but costs the plan its freedom to give V more bits than Q and K: on SmolLM2 the
perplexity rise went from +4.30% to +5.87% (docs/results.md), so the int4 recipe leaves it off.

The choice is written on each reading node as metadata (``graphc.quant.bits``,
``graphc.quant.block_size``) which ``quantize-nbits`` and ``quantize-gather-block`` follow
over their own ``bits``/``block_size``; run this pass just before them. The stats list every
choice (layer, bits, block, bytes, predicted error) and every measurement.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphc.core.errors import PassError, UnsupportedError
from graphc.core.executor import resolve as resolve_executor
from graphc.core.pass_base import GraphcPass, PassStats, choice
from graphc.passes import _blockquant as bq
from graphc.passes import _cut_evaluator
from graphc.passes import _probes
from graphc.passes._plan import precision as pp
from graphc.passes import _row_use as row_use
from graphc.passes import _siblings
from graphc.passes import _sensitivity as sens
from graphc.passes._weights import META_BITS, META_BLOCK, META_COLD_BITS, META_COLD_BLOCK, META_HOT_ROWS
from graphc.core.registry import register


@dataclass(frozen=True)
class SizeReference:
    """How a reference 4-bit quantizer lays a model out (symmetric, one scale a block)."""

    bits: int
    block: int
    tied_once: bool  # a table both looked up and read as the LM head stored once (else once per use)
    tables: bool  # an untied looked-up table quantized (else left float)


# size_like budgets: ONNX Runtime's MatMulNBitsQuantizer with its defaults on MatMul and Gather,
# onnxruntime-genai's model builder with `-p int4 -e cpu`
SIZE_LIKE = {"rtn4-b128": SizeReference(4, 128, tied_once=False, tables=True),
             "genai-int4": SizeReference(4, 32, tied_once=True, tables=False)}
GRAPH_MARGIN = 0.005  # of a size_like budget, left for the graph graphc's passes add
_TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


@dataclass(frozen=True)
class MixedPrecisionOptions:
    max_bits: float = 4.5  # budget: mean stored bits per planned weight (4.5: int4/b32 asymmetric's size); 0 = none
    max_bytes: int = 0  # budget: whole-model bytes; 0 = none
    size_like: str = ""  # budget: whole-model bytes of a reference quantizer ("rtn4-b128", "genai-int4"); "" = none
    max_error: float = 0.0  # budget: predicted mean 1 - cosine of output rows; 0 = none
    bits: tuple[int, ...] = (2, 4, 8)
    block_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    symmetric: bool = False  # as the quantizing passes will be run
    scale_dtype: str = "float16"
    # quantizer of the measured probes: rtn, mse, hqq, or gptq (MatMuls by GPTQ on the calibration
    # Hessians, act_order, as quantize-nbits runs it; tables by mse, as quantize-gather-block)
    method: str = bq.Method.RTN.value
    metric: str = "cosine"  # cosine: mean 1 - cosine of output rows; kl: mean KL of softmax rows (LM logits)
    probe_bits: tuple[int, ...] = (4,)  # bit widths measured (at probe_block); the rest predicted
    probe_block: int = 32
    measure_all: bool = False  # measure every candidate instead of predicting from probes
    feeds: int = 2  # calibration feeds used (each measurement runs them all)
    # measure on the first N tokens of each feed's sequences (0: all): fewer tokens, cheaper probes,
    # noisier estimates; token inputs only (not a KV-cache graph's past)
    probe_tokens: int = 0
    matmuls: bool = True
    embeddings: bool = True
    min_rows: int = 64  # smaller tables are not planned (quantize-gather-block's default)
    exclude: tuple[str, ...] = ()  # substrings of node names or scopes not planned
    split_rows: bool = True  # an embedding table may keep the rows calibration uses at more bits
    # gptq probes fitted on Hessians without the measured feeds: GPTQ fits its calibration tokens,
    # so measured on them it looks ~2x better than on new text (SmolLM2, see _hessians)
    held_out: bool = True
    damp: float = 0.01  # gptq probes' Hessian damping (as quantize-nbits' damp)
    # each probe runs from the first block reading its weight, from the float model's values there
    # (the same errors to float rounding, 0.74x the time on SmolLM2); false: whole forward passes
    cut_probes: bool = True
    # MatMuls that read one input (Q/K/V, gate/up) planned as one layer: one probe with all of them
    # quantized, one choice of bits and block, so that pack-nbits can store them as one MatMulNBits
    siblings: bool = False


@register
class MixedPrecision(GraphcPass):
    name = "mixed-precision"
    summary = ("per-layer bits and block size from measured output sensitivity, to a size (bits/bytes) or "
               "error budget; drives quantize-nbits and quantize-gather-block")
    Options = MixedPrecisionOptions
    needs_calibration = True
    uses_executor = True  # the probes, one work item a layer
    keeps_activations = True  # annotates nodes with their planned bits, changes no value

    @property
    def held_out_feeds(self) -> int:
        """GPTQ probes' Hessians leave out the feeds the probes are measured on (see _hessians)."""
        o = self.options
        return o.feeds if o.held_out and o.method == "gptq" else 0

    @property
    def calibration_texts(self) -> int:
        """Texts wanted: GPTQ's Hessians want thousands of tokens; row use is counted on them all."""
        return bq.GPTQ_CALIBRATION_TEXTS if self.options.method == bq.Method.GPTQ.value else 64

    def _validate(self) -> tuple[bq.Method, list[sens.QuantConfig]]:
        o = self.options
        method = choice(bq.Method, o.method, "method", self.name)
        if method is bq.Method.HQQ and o.symmetric:
            raise UnsupportedError("method='hqq' needs symmetric=false", pass_name=self.name)
        for name in ("max_bits", "max_bytes", "max_error"):
            if getattr(o, name) < 0:
                raise UnsupportedError(f"{name}={getattr(o, name)} is negative; a budget is > 0 (0 = unset)",
                                       pass_name=self.name)
        if o.size_like not in ("", *SIZE_LIKE):
            raise UnsupportedError(f"size_like={o.size_like!r}; supported: "
                                   f"{', '.join(repr(k) for k in ('', *SIZE_LIKE))}", pass_name=self.name)
        if not (o.max_bits or o.max_bytes or o.size_like or o.max_error):
            raise UnsupportedError("no budget: set max_bits (mean bits per weight), max_bytes (model bytes), "
                                   "size_like or max_error (predicted mean 1 - cosine)", pass_name=self.name)
        if sum(map(bool, (o.max_bits, o.max_bytes, o.size_like))) > 1:
            given = [k for k in ("max_bits", "max_bytes", "size_like") if getattr(o, k)]
            raise UnsupportedError(f"{' and '.join(given)} are size budgets: set one", pass_name=self.name)
        if o.max_error >= 1 and o.metric == "cosine":
            raise UnsupportedError(f"max_error={o.max_error} is not below 1 (it is 1 - cosine)", pass_name=self.name)
        bad = [b for b in o.bits if b not in bq.MATMUL_NBITS_BITS]
        if bad or not o.bits:
            raise UnsupportedError(f"bits={list(o.bits)}; supported: {', '.join(map(str, bq.MATMUL_NBITS_BITS))}",
                                   pass_name=self.name)
        if not o.probe_bits or any(b not in bq.MATMUL_NBITS_BITS for b in o.probe_bits):
            raise UnsupportedError(f"probe_bits={list(o.probe_bits)}; supported: "
                                   f"{', '.join(map(str, bq.MATMUL_NBITS_BITS))}", pass_name=self.name)
        bad = [b for b in (*o.block_sizes, o.probe_block) if b not in bq.BLOCK_SIZES]
        if bad or not o.block_sizes:
            raise UnsupportedError(f"block size(s) {bad or '[]'}; supported: {', '.join(map(str, bq.BLOCK_SIZES))}",
                                   pass_name=self.name)
        if o.scale_dtype not in sens.SCALE_BYTES:
            raise UnsupportedError(f"scale_dtype={o.scale_dtype!r}; supported: {', '.join(sens.SCALE_BYTES)}",
                                   pass_name=self.name)
        if o.metric not in sens.METRICS:
            raise UnsupportedError(f"metric={o.metric!r}; supported: {', '.join(sens.METRICS)}", pass_name=self.name)
        if not 0 < o.damp < 10:
            raise UnsupportedError(f"damp={o.damp}; a fraction of the Hessian's mean diagonal in (0, 10)",
                                   pass_name=self.name)
        if o.feeds < 1:
            raise UnsupportedError(f"feeds={o.feeds}; at least 1", pass_name=self.name)
        if o.probe_tokens < 0 or o.probe_tokens == 1:
            raise UnsupportedError(f"probe_tokens={o.probe_tokens}; 0 (all) or at least 2", pass_name=self.name)
        configs = sorted({sens.QuantConfig(b, k) for b in o.bits for k in o.block_sizes})
        return method, configs

    def _candidates(self, layer: sens.Layer, configs: list[sens.QuantConfig]) -> list[sens.QuantConfig]:
        rows, cols = layer.shape
        out = []
        for c in configs:
            if (layer.kind == "embedding" or layer.tied) and cols * c.bits % 8:
                continue  # GatherBlockQuantized packs whole bytes per row
            if layer.tied and cols % c.block_size:
                continue  # the table shares the head's MatMulNBits weights only in whole blocks
            nbytes = self._bytes(layer, c)
            dominated = any(d.bits == c.bits and d.block_size < c.block_size and self._bytes(layer, d) <= nbytes
                            for d in configs)
            if not dominated:
                out.append(c)
        return out

    def _bytes(self, layer: sens.Layer, c: sens.QuantConfig) -> int:
        rows, cols = layer.shape
        nbytes = sens.config_bytes(rows, cols, c, symmetric=self.options.symmetric, scale_dtype=self.options.scale_dtype)
        if layer.tied and not self.options.symmetric and c.bits < 8:
            # the shared table's GatherBlockQuantized needs the head's packed zero points unpacked
            # (one byte per row and block; quantize-gather-block._emit_tied)
            nbytes += rows * -(-cols // c.block_size)
        return nbytes

    def _cropped(self, feeds: list[dict], stats: PassStats) -> list[dict]:
        """The feeds cut to their first ``probe_tokens`` positions (token inputs [batch, seq] only;
        a feed with other inputs, such as a KV cache's past, is kept whole)."""
        n, out = self.options.probe_tokens, []
        for feed in feeds:
            if any(k not in _TOKEN_INPUTS for k in feed) or any(np.ndim(v) != 2 for v in feed.values()):
                stats.notes.append(f"probe_tokens={n}: feeds with inputs other than tokens are measured whole")
                return feeds
            out.append({k: np.ascontiguousarray(v[:, :n]) for k, v in feed.items()})
        stats.notes.append(f"probes measured on the first {n} tokens of each sequence")
        return out

    def _size_like(self, layers: list[sens.Layer], fixed: int) -> int:
        """The ``size_like`` budget in bytes (see the module doc), laid out as the reference
        quantizer stores it: a MatMul weight [K, N] as MatMulNBits (N x ceil(K / block) blocks of
        block x bits / 8 bytes, K padded to whole blocks, one scale a block), a looked-up table
        [V, D] as GatherBlockQuantized (V x D x bits / 8 bytes unpadded, one scale a block) or
        float; scales in the weight's float type. A tied table is both, or (``tied_once``) the
        head's MatMulNBits alone."""
        ref = SIZE_LIKE[self.options.size_like]
        bits, block = ref.bits, ref.block
        planned = 0
        for layer in layers:
            rows, cols = layer.shape
            n_blocks = -(-cols // block)
            arr_dtype = layer.value.const_value.dtype
            scale = 2 if arr_dtype == ir.DataType.FLOAT16 else 4
            if layer.kind == "matmul":  # rows = N outputs, cols = K inputs
                planned += rows * n_blocks * (block * bits // 8 + scale)
            if layer.tied and ref.tied_once:
                continue
            if layer.kind == "embedding" and not ref.tables:  # rows = vocabulary, cols = width
                planned += rows * cols * arr_dtype.itemsize
            elif layer.kind == "embedding" or layer.tied:
                planned += -(-rows * cols * bits // 8) + rows * n_blocks * scale
        return fixed + int(planned * (1 - GRAPH_MARGIN))

    def _bytes_rows(self, rows: int, cols: int, c: sens.QuantConfig) -> int:
        return sens.config_bytes(rows, cols, c, symmetric=self.options.symmetric, scale_dtype=self.options.scale_dtype)

    def _row_splits(self, layer: sens.Layer) -> list:
        """Candidate used/other row splits of an embedding table (``_row_use``)."""
        if layer.kind != "embedding" or len(layer.nodes) != 1:
            return []
        ids = row_use.calibration_ids(self.context.calibration or [], layer.nodes[0].inputs[1].name)
        return row_use.row_splits(layer.view(), ids) if ids is not None else []

    def run(self, model: ir.Model, stats: PassStats) -> bool:
        method, configs = self._validate()
        o = self.options
        feeds = list(self.context.calibration or [])[: o.feeds]
        if not feeds:
            raise PassError("needs calibration data (the output error of each layer is measured on it), and none "
                            "was given: use a model exported by graphc (its recipe's texts) or pass calibration "
                            "feeds in the PassContext", pass_name=self.name)
        if o.probe_tokens:
            feeds = self._cropped(feeds, stats)
        layers, skipped = sens.find_layers(model.graph, matmuls=o.matmuls, embeddings=o.embeddings,
                                           min_rows=o.min_rows, min_cols=min(o.block_sizes), exclude=o.exclude)
        for what, why in skipped:
            stats.skip(what, why)
        if o.siblings:
            layers = _siblings.group(layers)
            stats.counts["sibling_groups"] = sum(isinstance(u, _siblings.Siblings) for u in layers)
        cands = {id(layer): self._candidates(layer, configs) for layer in layers}
        layers = [layer for layer in layers if cands[id(layer)]]
        if not layers:
            stats.notes.append("no quantizable weight found")
            return False
        start = time.perf_counter()
        from graphc.core import streaming

        # a large model streams (graphc.core.streaming): its probes go segment by segment, in this process;
        # one that fits keeps a session from each cut, and each probe starts at its layer's (_cut_evaluator)
        evaluator = None
        if not streaming.applies(model):
            evaluator = _cut_evaluator.evaluator(model, _siblings.flatten(layers), feeds, o.metric, cut=o.cut_probes)
            if isinstance(evaluator, _cut_evaluator.CutEvaluator):
                stats.counts["probe_cuts"] = evaluator.start_count
        measured, predicted = self._measure(model, evaluator, layers, feeds, cands, method, stats)
        stats.counts["measure_s"] = round(time.perf_counter() - start, 1)

        options, combos = [], []
        for layer in layers:
            mine = cands[id(layer)]
            opts = [pp.Option(c.label, self._bytes(layer, c), predicted[id(layer)][c]) for c in mine]
            combo: list[tuple] = [(c, None) for c in mine]
            splits = self._row_splits(layer) if o.split_rows else []
            rows, cols = layer.shape
            map_bytes = rows * (2 if rows <= np.iinfo(np.int16).max else 4)
            for split in splits:
                for h in mine:
                    for c in mine:
                        if (c.bits, -c.block_size) >= (h.bits, -h.block_size):
                            continue  # the other rows at no fewer bytes than the used ones: no split
                        n_hot = len(split.hot)
                        nbytes = self._bytes_rows(n_hot, cols, h) + self._bytes_rows(rows - n_hot, cols, c) + map_bytes
                        error = ((1 - split.cold_share) * predicted[id(layer)][h]
                                 + split.cold_share * predicted[id(layer)][c])
                        opts.append(pp.Option(f"{h.label} on {n_hot} rows + {c.label}", nbytes, error))
                        combo.append((h, (c, split)))
            options.append(opts)
            combos.append(combo)
        params = sum(layer.params for layer in layers)
        planned = {layer.value.name for layer in _siblings.flatten(layers)}
        fixed = sum(_nbytes(v) for v in model.graph.initializers.values() if v.name not in planned)
        if o.max_bits:
            max_bytes, fixed_bytes = int(o.max_bits * params / 8), 0
        elif o.max_bytes:
            max_bytes, fixed_bytes = o.max_bytes, fixed
        elif o.size_like:
            max_bytes, fixed_bytes = self._size_like(layers, fixed), fixed
            smallest = fixed + sum(min(opt.nbytes for opt in opts) for opts in options)
            if smallest > max_bytes:  # e.g. toy models whose weights are mostly too small for the blocks
                stats.notes.append(f"size_like {o.size_like}: {max_bytes:,} bytes cannot be met (the smallest plan "
                                   f"takes {smallest:,.0f}); the smallest plan is taken")
                max_bytes = int(smallest)
            stats.counts["budget_bytes"] = max_bytes
        else:
            max_bytes, fixed_bytes = None, 0
        pick = pp.plan(options, max_bytes=max_bytes, max_error=o.max_error or None, fixed_bytes=fixed_bytes,
                       pass_name=self.name)

        choices = []
        for layer, opts, combo, i in zip(layers, options, combos, pick):
            c, split = combo[i]
            for node in layer.nodes:
                node.metadata_props[META_BITS] = str(c.bits)
                node.metadata_props[META_BLOCK] = str(c.block_size)
                if split is not None:
                    node.metadata_props[META_HOT_ROWS] = ",".join(map(str, split[1].hot.tolist()))
                    node.metadata_props[META_COLD_BITS] = str(split[0].bits)
                    node.metadata_props[META_COLD_BLOCK] = str(split[0].block_size)
            if split is not None:
                stats.notes.append(
                    f"{layer.name}: {len(split[1].hot)} rows at {c.label} (used in calibration, plus the largest-norm "
                    f"{split[1].promoted:.0%} of the unseen), the others at {split[0].label} (expected share of "
                    f"new text's reads on them: {split[1].cold_share:.3f})")
            choices.append({
                "layer": layer.name, "kind": layer.kind, "nodes": [n.name for n in layer.nodes],
                "params": layer.params, "bits": c.bits, "block_size": c.block_size, "bytes": opts[i].nbytes,
                "bits_per_weight": round(8 * opts[i].nbytes / layer.params, 3),
                "predicted_error": float(f"{opts[i].error:.4g}"),
                "measured_error": (float(f"{measured[id(layer)][c]:.4g}") if c in measured[id(layer)] else None),
                **({"used_rows": len(split[1].hot), "promoted_unseen": split[1].promoted,
                    "other_rows_bits": split[0].bits, "other_rows_block_size": split[0].block_size,
                    "other_rows_read_share": round(split[1].cold_share, 4)}
                   if split is not None else {}),
            })
            stats.add(f"layers_at_{c.label}")
        planned_bytes = sum(c["bytes"] for c in choices)
        error = sum(opts[i].error for opts, i in zip(options, pick))
        stats.counts.update({
            "layers_planned": len(layers),
            "planned_params": params,
            "planned_bytes": planned_bytes,
            "planned_bits_per_weight": round(8 * planned_bytes / params, 4),
            "predicted_error": float(f"{error:.4g}"),
            **({"predicted_cosine": round(1.0 - error, 6)} if o.metric == "cosine" else
               {"predicted_kl": float(f"{error:.4g}"), "predicted_perplexity_rise": round(float(np.expm1(error)), 5)}),
        })
        if o.max_bytes or o.size_like:
            stats.counts["other_bytes"] = fixed
        stats.details["choices"] = choices
        stats.details["sensitivities"] = [
            {"layer": layer.name, "config": c.label, "bits": c.bits, "block_size": c.block_size,
             "error": float(f"{predicted[id(layer)][c]:.4g}"), "measured": c in measured[id(layer)]}
            for layer in layers for c in cands[id(layer)]
        ]
        stats.notes.append(
            f"sensitivity ({o.metric}) on {len(feeds)} calibration feeds ({self.context.calibration_source}), "
            f"quantizer {method.value}; budget " + ", ".join(
                f"{k}={getattr(o, k)}" for k in ("max_bits", "max_bytes", "size_like", "max_error") if getattr(o, k))
            + (f" ({max_bytes:,} bytes)" if o.size_like else "")
        )
        return True

    def _measure(self, model: ir.Model, evaluator: sens.Evaluator | _cut_evaluator.CutEvaluator | None,
                 layers: list[sens.Layer], feeds: list[dict], cands: dict, method: bq.Method, stats: PassStats):
        """measured[id(layer)][config] (output error runs) and predicted[id(layer)][config] for
        every candidate: measured where measured, else the probe of the nearest bit width times
        the squared ratio of round-to-nearest weight errors (Hessian-weighted for MatMuls when
        measuring GPTQ, whose gain is taken to hold across configurations)."""
        o = self.options
        gptq = method is bq.Method.GPTQ
        hessians = self._hessians(model, layers, stats) if gptq else _LayerGrams({}, {})
        runs = []
        for layer in layers:
            mine = cands[id(layer)]
            probes = list(mine) if o.measure_all else [sens.QuantConfig(b, o.probe_block) for b in sorted(set(o.probe_bits))]
            runs.append((layer, probes))
        total = sum(len(p) for _, p in runs)
        start = time.perf_counter()
        if evaluator is None:
            results = self._probe_streamed(model, feeds, runs, cands, method, hessians, total, stats)
        else:
            results = self._probe(evaluator, runs, cands, method, hessians, total, stats)
        stats.counts["probe_s"] = round(time.perf_counter() - start, 2)
        measured: dict[int, dict] = {}
        predicted: dict[int, dict] = {}
        for (layer, _), result in zip(runs, results):
            m, werr = result.measured, result.weight_error
            p = {}
            for c in cands[id(layer)]:
                if c in m:
                    p[c] = m[c]
                    continue
                probe = min(m, key=lambda q: (abs(q.bits - c.bits), q.bits))
                ratio = werr[c] / werr[probe] if werr[probe] > 0 else 0.0
                p[c] = m[probe] * ratio * ratio
            measured[id(layer)], predicted[id(layer)] = m, p
        stats.counts["measurement_runs"] = total
        return measured, predicted

    def _probe(self, evaluator: sens.Evaluator | _cut_evaluator.CutEvaluator, runs: list, cands: dict,
               method: bq.Method, hessians: Mapping, total: int, stats: PassStats) -> list[_probes.ProbeResult]:
        """Every layer's probes through the context's executor (this process unless the run has
        workers): the model and feeds are shared once, each layer is one item (with its Hessian for
        GPTQ), and the results come back in layer order whatever order the workers finish in."""
        o = self.options
        executor = resolve_executor(self.context.executor)
        stats.counts["probe_workers"] = executor.workers
        key = uuid.uuid4().hex
        shared = _probes.ProbeShared(key, evaluator.payload(), symmetric=o.symmetric, scale_dtype=o.scale_dtype,
                                     damp=o.damp, threads=executor.threads_per_item)
        items = self._items(runs, cands, method, hessians)
        done, what = 0, "probes" + (f" on {executor.workers} workers" if executor.workers > 1 else "")
        self.context.report(what, 0, total)

        def arrived(i: int, result: _probes.ProbeResult) -> None:  # as each layer's result comes back
            nonlocal done
            done += len(runs[i][1])
            self.context.report(what, done, total)

        _probes.register_local(key, evaluator)
        try:
            return executor.map(_probes.probe_layer, items, shared=shared,
                                labels=[f"probe of layer {layer.name}" for layer, _ in runs], on_result=arrived)
        finally:
            _probes.forget(key)

    @staticmethod
    def _items(runs: list, cands: dict, method: bq.Method, hessians: Mapping, *, with_hessians: bool = True
               ) -> list[_probes.ProbeItem]:
        """One work item a layer: its probes, the candidates whose weight errors are wanted, its
        Hessian (unless ``with_hessians`` is False: the caller reads them one at a time)."""
        gptq = method is bq.Method.GPTQ
        items = []
        for layer, probes in runs:
            probe_method = method if (id(layer) in hessians or not gptq) else bq.Method.MSE  # tables: as gather-block
            items.append(_probes.ProbeItem(layer.value.name, layer.transposed, probe_method.value, tuple(probes),
                                           tuple(sorted({*cands[id(layer)], *probes})),
                                           hessians.get(id(layer)) if with_hessians else None,
                                           layer.member_keys if isinstance(layer, _siblings.Siblings) else (),
                                           hessians.tokens(id(layer)) if isinstance(hessians, _LayerGrams) else 0))
        return items

    def _probe_streamed(self, model: ir.Model, feeds: list[dict], runs: list, cands: dict, method: bq.Method,
                        hessians: _LayerGrams, total: int, stats: PassStats) -> list[_probes.ProbeResult]:
        """The probes with the model run segment by segment (passes/_streamed_probes.py): in this
        process, or with workers, the items whose probes start in one segment as one work item
        (the reference's values at the cuts and the Hessians reach them as files)."""
        from graphc.passes import _streamed_probes

        o = self.options
        executor = resolve_executor(self.context.executor)
        items = self._items(runs, cands, method, hessians, with_hessians=False)
        stats.counts["probe_streamed"] = 1
        kw = {"symmetric": o.symmetric, "scale_dtype": o.scale_dtype, "damp": o.damp}
        if executor.workers > 1 and getattr(executor, "single_node", False):
            stats.counts["probe_workers"] = executor.workers
            what = f"probes (streamed) on {executor.workers} workers"
            self.context.report(what, 0, total)
            return _streamed_probes.probe_on_workers(
                model, items, feeds, o.metric, executor, **kw,
                hessian=lambda i: hessians.get(id(runs[i][0])),
                hessian_key=lambda i: hessians.input_of(id(runs[i][0])),
                labels=[f"probe of layer {layer.name}" for layer, _ in runs],
                report=lambda done: self.context.report(what, done, total))
        if executor.workers > 1:
            stats.details.setdefault("notices", []).append(
                "probes ran in this process, segment by segment: the model is large enough to stream, and the "
                "Ray cluster has several nodes (workers read the weights and cut values as files of this machine)")
        stats.counts["probe_workers"] = 1
        what = "probes (streamed)"
        self.context.report(what, 0, total)
        return _streamed_probes.probe_results(
            model, items, feeds, o.metric, **kw, hessian=lambda i: hessians.get(id(runs[i][0])),
            report=lambda done, runs_total: self.context.report(what, round(total * done / runs_total), total))

    def _hessians(self, model: ir.Model, layers: list[sens.Layer], stats: PassStats) -> _LayerGrams:
        """Each MatMul layer's input Hessian (quantize-nbits' own, from the calibration feeds)."""
        from types import SimpleNamespace

        from graphc.passes.quantize_nbits import QuantizeNBits

        mm = [layer for layer in layers if layer.kind == "matmul"]
        if not mm:
            return _LayerGrams({}, {})
        # The probes are measured on the first ``feeds`` calibration feeds. A GPTQ fit whose
        # Hessian includes those tokens is partly fitted to them: on SmolLM2 (PyTorch, int4/b64)
        # single-layer KLs on a window inside the Hessian were 1.2-3.6x lower than with that window
        # held out, and the plan's predicted KL (0.028) was 2.5x below the whole model's on the eval
        # text (0.069), while the layers' errors on held-out text add up (sum of singles 0.143,
        # joint 0.145). So the probes' Hessians leave the measured feeds out where others remain.
        feeds = list(self.context.calibration or [])
        n = self.options.feeds
        ctx = self.context
        if self.options.held_out and len(feeds) > n:
            ctx = dataclasses.replace(self.context, calibration=feeds[n:])
            stats.notes.append(f"probe Hessians from calibration feeds {n + 1}-{len(feeds)} (the measured "
                               f"{n} held out)")
        elif self.options.held_out:
            stats.notes.append(f"probe Hessians include the measured feeds (only {len(feeds)} calibration feeds): "
                               "GPTQ probes look better than on new text")
        nbits = QuantizeNBits(QuantizeNBits.Options(method="gptq"), ctx)
        by_input = nbits._hessians(model, [SimpleNamespace(node=layer.nodes[0]) for layer in mm], stats)
        return _LayerGrams(by_input, {id(layer): layer.nodes[0].inputs[0].name for layer in mm})


class _LayerGrams(Mapping):
    """``{id(layer): Hessian}``, each read from the pass's input moments when asked for (a
    streamed sweep keeps them on disk)."""

    def __init__(self, by_input: Mapping[str, np.ndarray], names: dict[int, str]) -> None:
        self._by_input, self._names = by_input, names

    def __getitem__(self, key: int) -> np.ndarray:
        return self._by_input[self._names[key]]

    def __contains__(self, key: object) -> bool:  # without reading the Hessian (Mapping's would)
        return key in self._names

    def tokens(self, key: int) -> int:
        """The calibration rows layer ``key``'s Hessian averages (0 when not known)."""
        tokens = getattr(self._by_input, "tokens", None)
        return int(tokens(self._names[key])) if tokens is not None and key in self._names else 0

    def input_of(self, key: int) -> str | int:
        """The input whose Hessian layer ``key`` reads (layers reading one input share it)."""
        return self._names.get(key, key)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _nbytes(value: ir.Value) -> int:
    t = value.const_value
    if t is None:
        return 0
    return int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
