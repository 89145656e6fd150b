"""int8 LSTM (ONNX Runtime's DynamicQuantizeLSTM, as ``quantize-lstm`` writes it) vs the float
LSTM: latency and output error, on bidirectional LSTMs of a few sizes with random weights
(no real LSTM model installs offline whose LSTM the int8 recipe keeps int8; silero-vad's stays
float by the error budget).

    python bench/bench_lstm.py [--reps 30] [--json OUT]

One process, 2 intra-op threads, the sessions interleaved (graphc.checks.measure); the CPU is
named in the output. Each int8 form this machine runs exactly is timed (u8s8 where u8xs8 does
not saturate, u8u8 everywhere).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx_ir as ir

from graphc.checks import measure
from graphc.core import target
from graphc.core.pass_base import PassContext, PassStats
from graphc.passes.quantize_lstm import LstmInt8Options, QuantizeLstm

SHAPES = ((256, 128, 50, 1), (512, 256, 50, 8), (1024, 512, 100, 8))  # hidden, input width, seq, batch


def lstm_model(hidden: int, width: int) -> ir.Model:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((2, 4 * hidden, width)) / np.sqrt(width)).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((2, 4 * hidden, hidden)) / np.sqrt(hidden)).astype(np.float32), "R"),
             numpy_helper.from_array((rng.standard_normal((2, 8 * hidden)) * 0.1).astype(np.float32), "B")]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "h", "c"], hidden_size=hidden, direction="bidirectional")
    graph = helper.make_graph([node], "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", "batch", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    here = target.host()
    forms = [f.value for f in target.exact_forms(here) if f.value in ("u8s8", "u8u8")]
    print(f"CPU: {target.cpu_name()} (graphc target {here.name}); forms timed: {', '.join(forms)}")
    rows = []
    print("| hidden × input, seq × batch | fp32 ms | " + " | ".join(f"int8 {f} ms (× fp32) | {f} cosine" for f in forms) + " |")
    print("|---|--:|" + "--:|--:|" * len(forms))
    for hidden, width, seq, batch in SHAPES:
        x = np.random.default_rng(1).standard_normal((seq, batch, width)).astype(np.float32)
        models = {"fp32": lstm_model(hidden, width)}
        for form in forms:
            m = lstm_model(hidden, width)
            QuantizeLstm(LstmInt8Options(form=form), context=PassContext(target=here)).run(m, PassStats())
            models[form] = m
        sessions = {k: measure.session(ir.serde.serialize_model(m).SerializeToString(), threads=2) for k, m in models.items()}
        lat = measure.interleaved_latency(sessions, {"x": x}, reps=args.reps, warmup=3)
        ref = sessions["fp32"].run(None, {"x": x})[0].ravel()
        row = {"hidden": hidden, "width": width, "seq": seq, "batch": batch, "fp32_ms": lat["fp32"].median_ms}
        cells = []
        for form in forms:
            got = sessions[form].run(None, {"x": x})[0].ravel()
            cos = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
            row[form] = {"ms": lat[form].median_ms, "cosine": cos}
            cells.append(f"{lat[form].median_ms:.2f} ({lat[form].median_ms / lat['fp32'].median_ms:.2f}×) | {cos:.5f}")
        rows.append(row)
        print(f"| {hidden} × {width}, {seq} × {batch} | {lat['fp32'].median_ms:.2f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"cpu": target.cpu_name(), "target": here.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
