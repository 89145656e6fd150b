"""GPTQ variants on SmolLM2-135M with the built-in ``int4`` plan held fixed, judged by perplexity.

The built-in ``int4`` recipe (its decoder form) runs on the cached SmolLM2 export
(bench_smollm2_int4.py's) up to ``quantize-nbits`` once: the AWQ-scaled float model with the
``mixed-precision`` plan written on its nodes, and the Hessians of its MatMul inputs from the
recipe's own calibration sweep (128 windows of 512 tokens), are kept under
``.graphc-cache/bench/nbits-variants/`` (~7 minutes on 2 cores). Each variant then runs
``quantize-nbits`` and the recipe's later passes on that model (~1 minute) and is measured on the
perplexity windows of bench_smollm2_int4.py (16 × 512 tokens of the Wikipedia eval split, text
that calibration never reads). The plan, AWQ's scales and the bytes are the same for every
variant, so the perplexities compare the quantizer alone. "recipe" is the recipe's own result.

Variants that are not options of ``quantize-nbits`` are written here as patches of the block
quantizer's functions (``passes/_blockquant.py``), undone after each variant.

usage: .venv/bin/python bench/bench_nbits_variants.py [--only NAME ...] [--fresh] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, WORK, Reporter, cpu_name, environment, fingerprint, quiet  # noqa: E402

OUT = WORK / "nbits-variants"
SNAPSHOT = OUT / "planned.onnx"
WINDOWS = 16  # perplexity windows of 512 tokens (bench_smollm2_int4.py's default)


# --------------------------------------------------------------------------- snapshot


def take_snapshot(fp32: Path, rep: Reporter) -> None:
    """The recipe up to quantize-nbits: its input model (plan on the nodes) and Hessians, saved."""
    import onnx_ir as ir

    import graphc
    from graphc.passes import quantize_nbits as qn
    from graphc.passes._weights import META_BITS

    OUT.mkdir(parents=True, exist_ok=True)
    import shutil

    for stale in OUT.glob("grams-*"):  # Hessians of the snapshot being replaced
        shutil.rmtree(stale)
    original = qn.QuantizeNBits._hessians

    class Saved(BaseException):  # not an error: through the pass manager's handlers
        pass

    def grab(self, model, cands, stats):
        hessians = original(self, model, cands, stats)
        if not any(META_BITS in n.metadata_props for n in model.graph):
            return hessians  # mixed-precision's probes ask for them too, before the plan exists
        save_grams(hessians, OUT / "grams-128")
        ir.save(model, SNAPSHOT, external_data=SNAPSHOT.name + ".data")
        raise Saved

    qn.QuantizeNBits._hessians = grab
    try:
        with rep.status("built-in int4 up to quantize-nbits (the plan and the Hessians)"), quiet():
            graphc.compress(fp32, OUT / "unused.onnx", recipe="int4", force=True, validate=False, attribution=False)
    except Saved:
        pass
    finally:
        qn.QuantizeNBits._hessians = original
    (OUT / "snapshot.key").write_text(_snapshot_key(fp32) + "\n")


def save_grams(hessians, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for i, name in enumerate(hessians):
        np.save(folder / f"{i}.npy", np.asarray(hessians[name]))
        names[name] = i
    (folder / "names.json").write_text(json.dumps(names))


def load_grams(folder: Path) -> dict[str, np.ndarray]:
    names = json.loads((folder / "names.json").read_text())

    class Grams(dict):
        def __missing__(self, name: str) -> np.ndarray:
            return np.load(folder / f"{names[name]}.npy")

        def __contains__(self, name: object) -> bool:
            return name in names

    return Grams()


def snapshot_and_windows(windows: int) -> tuple[Any, list]:
    """The snapshot model and the first ``windows`` of the recipe's calibration windows (its own
    texts and window length; 207 is all that its 1,024 texts make)."""
    import onnx_ir as ir

    from graphc.checks.feeds import complete_decoder_feeds
    from graphc.models import get_model_spec

    model = ir.load(SNAPSHOT)
    spec = get_model_spec("smollm2")
    texts = spec.eval_texts(spec.calibration_max_texts, split="calibration")
    feeds = complete_decoder_feeds(model, spec.feeds(texts, batch=spec.calibration_batch or spec.validation_batch,
                                                     max_length=spec.calibration_length))[:windows]
    return model, feeds


def window_grams(windows: int, rep: Reporter) -> Path:
    """Hessians of the snapshot's MatMul inputs over the first ``windows`` calibration windows
    (the recipe's own texts and window length; 207 is all that its 1,024 texts make)."""
    from graphc.core.calibrate import input_moments

    folder = OUT / f"grams-{windows}"
    if (folder / "names.json").is_file():
        return folder
    model, feeds = snapshot_and_windows(windows)
    names = json.loads((OUT / "grams-128" / "names.json").read_text())
    values = {v.name: v for node in model.graph for v in node.inputs if v is not None and v.name in names}
    with rep.status(f"Hessians over {len(feeds)} calibration windows"):
        moments = input_moments(model, list(values.values()), feeds, pass_name="bench")
    save_grams({name: moments[name].gram for name in names}, folder)
    return folder


SEQUENTIAL_SEGMENTS = 32  # the model cut into about this many segments by weight bytes (~one block each)


def sequential_grams(rep: Reporter) -> Path:
    """Hessians as GPTQ sees them when the model before each layer is already quantized (GPTQ's
    own paper and AutoGPTQ run so): the snapshot cut into segments (``graphc.core.streaming``),
    then for each segment over the 128 calibration windows: its MatMul inputs' x^T x with the
    earlier segments' planned MatMuls replaced by their GPTQ results (the recipe's settings: the
    plan's bits and block, asymmetric, damp 0.1, act order, float16 scales), this segment's
    weights fitted on them, and the segment run again with those to feed the next. The tied
    LM head's input (read through a Transpose of the table tiers) keeps the float sweep's Hessian."""
    from graphc.core import streaming
    from graphc.core.calibrate import token_rows
    from graphc.passes import _blockquant as bq
    from graphc.passes._weights import META_BITS, META_BLOCK

    folder = OUT / "grams-sequential"
    if (folder / "names.json").is_file():
        return folder
    model, feeds = snapshot_and_windows(128)
    planned = [(n.inputs[0].name, n.inputs[1].name, int(n.metadata_props[META_BITS]), int(n.metadata_props[META_BLOCK]))
               for n in model.graph if n.op_type == "MatMul" and META_BITS in n.metadata_props
               and n.inputs[1].const_value is not None]
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    runner = streaming.StreamedModel(model, switchable=[w for _, w, _, _ in planned],
                                     segment_bytes=total // SEQUENTIAL_SEGMENTS, what="sequential Hessians")
    segment_of = {}
    for k, seg in enumerate(runner.segments):
        for w in seg.weights:
            segment_of.setdefault(w, k)
    graph = runner.proto.graph
    values: list[dict] = [{} for _ in feeds]
    fitted: dict[str, np.ndarray] = {}
    hessians: dict[str, np.ndarray] = {}
    with rep.bar(f"sequential Hessians, {len(runner.segments)} segments") as cb:
        for k, seg in enumerate(runner.segments):
            mine = [c for c in planned if segment_of[c[1]] == k]
            made = {o for i in seg.nodes for o in graph.node[i].output}
            xs = sorted({x for x, _, _, _ in mine})
            fetch = [x for x in xs if x in made]
            sums: dict[str, list] = {}
            part = runner.segment_session(k, fetch, lambda name: values[0][name]) if fetch else None
            for i, feed in enumerate(feeds if mine else []):
                got = dict(zip(fetch, runner.step(part, feed, values[i].__getitem__, fitted))) if part else {}
                for x in xs:
                    arr = got[x] if x in got else values[i].get(x, feed.get(x))
                    rows = np.ascontiguousarray(token_rows(np.asarray(arr), feed.get("attention_mask")), dtype=np.float32)
                    s = sums.setdefault(x, [0.0, 0])
                    s[0] = s[0] + (rows.T @ rows).astype(np.float64)
                    s[1] += len(rows)
            del part
            hessians.update({x: g / n for x, (g, n) in sums.items()})
            for x, w, bits, block in mine:
                w_t = np.ascontiguousarray(runner.arrays[w].T, dtype=np.float32)
                q = bq.gptq(w_t, hessians[x], bits, block, symmetric=False, scale_dtype=np.float16, damp=0.1,
                            act_order=True)
                fitted[w] = np.ascontiguousarray(q.dequantize().T)
            later = runner.needed_after(k, outputs=False)
            keeps = [n for n in seg.keeps if n in later]
            if keeps:
                part = runner.segment_session(k, keeps, lambda name: values[0][name])
                for i, feed in enumerate(feeds):
                    values[i].update(zip(keeps, runner.step(part, feed, values[i].__getitem__, fitted)))
                    for name in [n for n in values[i] if n not in later]:
                        del values[i][name]
                del part
            cb(k + 1, len(runner.segments))
    names = json.loads((OUT / "grams-128" / "names.json").read_text())
    recipe = load_grams(OUT / "grams-128")
    save_grams({n: hessians[n] if n in hessians else recipe[n] for n in names}, folder)
    return folder


def _snapshot_key(fp32: Path) -> str:
    sources = [(ROOT / "recipes" / "builtin" / "int4.toml").read_text()]
    sources += [p.read_text() for p in sorted((ROOT / "passes").rglob("*.py"))]
    return fingerprint((fp32.with_suffix(".key")).read_text(), *sources)


# --------------------------------------------------------------------------- variants


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def gptq_with(**overrides: Any) -> Callable:
    from graphc.passes import _blockquant as bq

    return patched(bq, "gptq", functools.partial(bq.gptq, **overrides))


def hessian_shrunk(a: float) -> Callable:
    """GPTQ's Hessian shrunk toward its diagonal: (1 - a) H + a diag(H)."""
    from graphc.passes import _blockquant as bq

    base = bq.gptq

    def gptq(w_t, hessian, *args, **kw):
        h = np.array(hessian, dtype=np.float64) * (1 - a)
        h[np.diag_indices_from(h)] += a * np.diagonal(hessian)
        return base(w_t, h, *args, **kw)

    return patched(bq, "gptq", gptq)


def _weighted_asym(x: np.ndarray, wt: np.ndarray, bits: int, scale_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """The mse range search (asymmetric) and its scale refit, on squared errors weighted by ``wt``."""
    from graphc.passes import _blockquant as bq

    qmax = (1 << bits) - 1

    def err(s, z):
        d = (bq._codes(x, s, z, qmax) - z[:, None]) * s[:, None] - x
        return np.einsum("ij,ij->i", d, d * wt)

    lo, hi = x.min(axis=1), x.max(axis=1)
    best_s, best_z = bq._asym_params(lo, hi, qmax, scale_dtype)
    best_e = err(best_s, best_z)
    for f in bq.shrink_grid(bits)[1:]:
        s, z = bq._asym_params(lo * f, hi * f, qmax, scale_dtype)
        e = err(s, z)
        better = e < best_e
        best_s, best_z, best_e = np.where(better, s, best_s), np.where(better, z, best_z), np.where(better, e, best_e)
    for _ in range(2):
        c = bq._codes(x, best_s, best_z, qmax) - best_z[:, None]
        den, num = np.einsum("ij,ij->i", c, c * wt), np.einsum("ij,ij->i", c * wt, x)
        cand = bq._fix_scale(np.where(den > 0, num / np.where(den > 0, den, 1), best_s), scale_dtype)
        e = err(cand, best_z)
        better = e < best_e
        best_s, best_e = np.where(better, cand, best_s), np.where(better, e, best_e)
    return best_s, best_z


@contextlib.contextmanager
def weighted_ranges() -> Iterator[None]:
    """act_order GPTQ's static block ranges chosen on squared errors weighted by each column's
    input power (the damped Hessian diagonal) instead of the weights' own."""
    from graphc.passes import _blockquant as bq

    state: dict[str, np.ndarray] = {}
    base_gptq, base_quantize = bq.gptq, bq.quantize

    def gptq(w_t, hessian, bits, block_size, **kw):
        diag = np.array(np.diagonal(hessian), dtype=np.float64)
        dead = diag <= 0
        diag[dead] = 1.0
        diag += kw.get("damp", 0.01) * float(np.mean(diag))
        state["w"] = np.where(dead, 0.0, diag).astype(np.float32)
        try:
            return base_gptq(w_t, hessian, bits, block_size, **kw)
        finally:
            state.pop("w", None)

    def quantize(x, bits, block_size, *, symmetric, method="rtn", scale_dtype=np.float32):
        cw = state.get("w")
        if cw is None or symmetric or x.shape[1] % block_size or method != "mse":
            return base_quantize(x, bits, block_size, symmetric=symmetric, method=method, scale_dtype=scale_dtype)
        rows, cols = x.shape
        nb = cols // block_size
        blocks = np.asarray(x, np.float32).reshape(rows * nb, block_size)
        wt = np.tile(cw.reshape(nb, block_size), (rows, 1))
        s, z = _weighted_asym(blocks, wt, bits, scale_dtype)
        q = bq._codes(blocks, s, z, (1 << bits) - 1).astype(np.uint8)
        return bq.BlockQuant(q.reshape(rows, nb, block_size), s.astype(scale_dtype).reshape(rows, nb),
                             z.astype(np.uint8).reshape(rows, nb), bits, block_size, cols, symmetric)

    with patched(bq, "gptq", gptq), patched(bq, "quantize", quantize):
        yield


@contextlib.contextmanager
def ranges_apart() -> Iterator[None]:
    """The mse range search (asymmetric) refined by coordinate steps that shrink the low and the
    high end apart (twice over the same factors) after the joint shrink."""
    from graphc.passes import _blockquant as bq

    def search(x, lo, hi, qmax, scale_dtype, bits):
        grid = bq.shrink_grid(bits)
        best_s, best_z = bq._asym_params(lo, hi, qmax, scale_dtype)
        best_e = bq._sq_error(x, best_s, best_z, qmax)
        f_lo, f_hi = np.ones(len(x), np.float32), np.ones(len(x), np.float32)
        tries = [("both", f) for f in grid[1:]] + [(side, f) for _ in range(2) for side in ("lo", "hi") for f in grid]
        for side, f in tries:
            a = lo * (f if side in ("both", "lo") else f_lo)
            b = hi * (f if side in ("both", "hi") else f_hi)
            s, z = bq._asym_params(a, b, qmax, scale_dtype)
            e = bq._sq_error(x, s, z, qmax)
            better = e < best_e
            best_s, best_z, best_e = np.where(better, s, best_s), np.where(better, z, best_z), np.where(better, e, best_e)
            if side in ("both", "lo"):
                f_lo = np.where(better, f, f_lo)
            if side in ("both", "hi"):
                f_hi = np.where(better, f, f_hi)
        return best_s, best_z

    with patched(bq, "_search_asymmetric", search):
        yield


@contextlib.contextmanager
def ranges_refitted() -> Iterator[None]:
    """act_order GPTQ run twice: the second run's static block ranges fitted (mse) to the values
    the columns had, after the first run's error updates, when each was quantized."""
    from graphc.passes import _blockquant as bq

    base_rows, base_quantize = bq._gptq_rows, bq.quantize

    def rows(w_t, *args, **kw):
        seen = np.zeros(np.shape(w_t), np.float32)
        base_rows(w_t, *args, **kw, record=seen)
        # the second run: its act_order start (the one quantize call) fitted to what the first saw
        with patched(bq, "quantize", lambda _w, *a, **k: base_quantize(seen, *a, **k)):
            base_rows(w_t, *args, **kw)

    with patched(bq, "_gptq_rows", rows):
        yield


VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "damp 0.05": {"sets": {"damp": 0.05}},
    "damp 0.2": {"sets": {"damp": 0.2}},
    "no act_order (ranges chosen as each block is reached)": {"sets": {"act_order": False}},
    "refit_scales": {"sets": {"refit_scales": True}},
    "ranges by min/max (no clipping search)": {"patch": lambda: gptq_with(search="rtn")},
    "ranges searched on input-power-weighted error": {"patch": weighted_ranges},
    "ranges searched with low and high ends apart": {"patch": ranges_apart},
    "ranges refitted to GPTQ's updated weights (two runs)": {"patch": ranges_refitted},
    "Hessian shrunk 10% toward its diagonal": {"patch": lambda: hessian_shrunk(0.1)},
    "Hessian shrunk 30% toward its diagonal": {"patch": lambda: hessian_shrunk(0.3)},
    "Hessians of 32 windows": {"windows": 32},
    "Hessians of 64 windows": {"windows": 64},
    "Hessians of 207 windows": {"windows": 207},
    "Hessians from the partly quantized model (sequential)": {"sequential": True},
    # quantize-nbits' refine_sweeps: coordinate descent on GPTQ's codes (_blockquant.refine_codes)
    "coordinate descent after GPTQ, 3 sweeps": {"sets": {"refine_sweeps": 3}},
    "coordinate descent after GPTQ, 8 sweeps": {"sets": {"refine_sweeps": 8}},
}


def run_variant(name: str, spec: dict[str, Any], grams: Path, feeds: list, rep: Reporter) -> dict[str, Any]:
    import onnx_ir as ir

    from bench_smollm2_int4 import ort_perplexity
    from graphc.core.pass_base import PassContext
    from graphc.core.recipes import BUILTIN
    from graphc.core.registry import get_pass
    from graphc.passes import quantize_nbits as qn

    steps = BUILTIN["int4"].decoder.steps
    start = [s.pass_name for s in steps].index("quantize-nbits")
    model = ir.load(SNAPSHOT)
    hessians = load_grams(grams)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    out = OUT / f"{slug}.onnx"
    t0 = time.perf_counter()
    patch = spec.get("patch", contextlib.nullcontext)
    with rep.status(f"{name}: quantize-nbits and the passes after it"), quiet(), \
            patched(qn.QuantizeNBits, "_hessians", lambda self, model, cands, stats: hessians), patch():
        for step in steps[start:]:
            options = {**step.options, **(spec.get("sets", {}) if step.pass_name == "quantize-nbits" else {})}
            get_pass(step.pass_name).from_dict(options, PassContext())(model)
    seconds = time.perf_counter() - t0
    ir.save(model, out)
    with rep.bar(f"{name}: perplexity, {len(feeds)} windows") as cb:
        ppl = ort_perplexity(out, feeds, 2, cb)
    return {"bytes": out.stat().st_size, "perplexity": ppl, "quantize_s": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these variants (default: all)")
    parser.add_argument("--fresh", action="store_true", help="take the snapshot again")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    from bench_smollm2_int4 import cached_fp32, torch_perplexity
    from graphc.models import get_model_spec

    rep = Reporter()
    unknown = [n for n in args.only or [] if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {unknown}; known: {list(VARIANTS)}")
    fp32 = cached_fp32(WORK, fresh=False)
    key = _snapshot_key(fp32)
    stamp = OUT / "snapshot.key"
    if args.fresh or not SNAPSHOT.is_file() or not stamp.is_file() or stamp.read_text().strip() != key:
        take_snapshot(fp32, rep)
    spec = get_model_spec("smollm2")
    feeds = spec.perplexity_feeds(WINDOWS, seq=512)
    torch_ppl = torch_perplexity(spec, feeds, WORK, 2, fresh=False)["perplexity"]
    results = {}
    for name in args.only or VARIANTS:
        v = VARIANTS[name]
        grams = (window_grams(v["windows"], rep) if v.get("windows") else
                 sequential_grams(rep) if v.get("sequential") else OUT / "grams-128")
        r = run_variant(name, v, grams, feeds, rep)
        r["rise_vs_torch_fp32"] = r["perplexity"]["perplexity"] / torch_ppl - 1
        results[name] = r
        rep.note(f"{name}: {r['bytes']:,} B, perplexity {r['perplexity']['perplexity']:.3f} "
                 f"({r['rise_vs_torch_fp32']:+.2%} over PyTorch fp32 {torch_ppl:.3f}), quantize {r['quantize_s']} s")
    res = {"cpu": cpu_name(), "environment": environment(), "windows": WINDOWS, "torch_fp32": torch_ppl,
           "variants": results}
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    print("| variant | bytes | perplexity | vs fp32 |\n|---|--:|--:|--:|")
    for name, r in results.items():
        print(f"| {name} | {r['bytes']:,} | {r['perplexity']['perplexity']:.3f} | {r['rise_vs_torch_fp32']:+.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
