"""DeBERTa-v3's attention fused into MultiHeadAttention against the same graph without that rule.

    python bench/bench_deberta_attention.py [--layers 6] [--hidden 768] [--heads 12] [--batch 8] [--seq 128]
                                            [--reps 15] [--json OUT]

A random DeBERTa-v3-shaped model (relative attention both ways, 256 position buckets, no
absolute positions; transformers ``from_config``, random weights: latency only), exported by
``graphc export``, then ``fuse-ort`` twice: as it is, and with the disentangled-attention rule
left out of its table (what graphc wrote before the rule existed). Both sessions at ORT's default
level with 2 threads, alternating call by call, median of ``reps`` rounds of 5 calls, on a batch
with padded rows; prints the CPU, both medians, the ratio and the largest output difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    import torch
    import transformers as t

    from harness import cpu_name

    from graphc.checks.measure import session
    from graphc.core.io import load_model, save_model
    from graphc.core.pass_base import PassContext
    from graphc.front import api
    from graphc.models.base import hf_offline
    from graphc.passes import fuse_ort
    from graphc.passes.fuse_ort import FuseOrt

    hf_offline()
    config = t.DebertaV2Config(hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, intermediate_size=4 * args.hidden, vocab_size=1000,
                               max_position_embeddings=512, relative_attention=True, pos_att_type=["p2c", "c2p"],
                               position_buckets=256, max_relative_positions=-1, norm_rel_ebd="layer_norm",
                               share_att_key=True, position_biased_input=False)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t.AutoModel.from_config(config, dtype=torch.float32).eval().save_pretrained(work / "hf")
        api.export(str(work / "hf"), work / "fp32.onnx")
        paths = {}
        for form in ("fused", "without the rule"):
            model = load_model(work / "fp32.onnx")
            saved = fuse_ort.FUSIONS
            if form != "fused":
                fuse_ort.FUSIONS = tuple(f for f in saved if f.key != "disentangled_attention")
            try:
                FuseOrt(FuseOrt.Options(), PassContext())(model)
            finally:
                fuse_ort.FUSIONS = saved
            paths[form] = work / f"{form.replace(' ', '_')}.onnx"
            save_model(model, paths[form])
            ops = [n.op_type for n in model.graph]
            print(f"{form}: MultiHeadAttention {ops.count('MultiHeadAttention')}, Softmax {ops.count('Softmax')}",
                  file=sys.stderr)
        rng = np.random.default_rng(0)
        ids = rng.integers(3, 1000, (args.batch, args.seq)).astype(np.int64)
        mask = np.ones_like(ids)
        for b in range(1, args.batch, 2):  # every other row padded to a different length
            mask[b, args.seq * (b + 1) // (args.batch + 1):] = 0
        sessions = {form: session(str(path), threads=args.threads) for form, path in paths.items()}
        feeds = {form: {k: v for k, v in {"input_ids": ids, "attention_mask": mask}.items()
                        if k in {i.name for i in s.get_inputs()}} for form, s in sessions.items()}
        outs = {form: s.run(None, feeds[form])[0] for form, s in sessions.items()}
        diff = float(np.abs(outs["fused"] - outs["without the rule"]).max())
        times: dict[str, list[float]] = {form: [] for form in sessions}
        for _ in range(args.reps):
            for form, s in sessions.items():
                start = time.perf_counter()
                for _ in range(5):
                    s.run(None, feeds[form])
                times[form].append((time.perf_counter() - start) / 5 * 1e3)
    med = {form: statistics.median(v) for form, v in times.items()}
    result = {"cpu": cpu_name(), "shape": vars(args) | {"json": None}, "ms": med,
              "ratio": med["fused"] / med["without the rule"], "max_abs_diff": diff}
    print(f"{result['cpu']}: b{args.batch} x {args.seq}, {args.layers} layers, hidden {args.hidden}: "
          f"fused {med['fused']:.1f} ms, without the rule {med['without the rule']:.1f} ms, "
          f"ratio {result['ratio']:.3f}, max abs diff {diff:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
