"""bench/bench_genai.py's perplexity-vs-bytes plot, drawn from a run's JSON without measuring."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(**rows):
    return {"cpu": {"name": "Test CPU", "target": "x86-avx2"},
            "config": {"windows": 8, "prompt": 512, "new_tokens": 128, "reps": 3},
            "load_before": [0.5], "load_after": [0.7], "bandwidth_gb_s": 30.0,
            "rows": {name: {"bytes": b, "perplexity": 20 * (1 + rise), "ppl_rise": rise, "prefill_ms": 1000.0,
                            "decode_tok_s": 50.0, "decode_vs_builder": 1.0, "bytes_per_token": 1e8,
                            "bound_fraction": 0.2, "compress_s": None}
                     for name, (b, rise) in rows.items()}}


def test_plot_from_json_draws_each_tools_folders_and_leaves_fp32_out(tmp_path):
    res = _run(**{"graphc fp32": (538_000_000, 0.0), "builder int4 default": (86_513_245, 0.3733),
                  "builder int4 k_quant_mixed": (113_627_597, 0.1307), "graphc int4": (95_183_747, 0.0434)})
    src, svg = tmp_path / "run.json", tmp_path / "out.svg"
    src.write_text(json.dumps(res))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_genai.py"), "--from-json", str(src),
                           "--plot", str(svg)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "| builder int4 default | 86,513,245 |" in proc.stdout  # the table, printed again
    text = svg.read_text()
    assert text.startswith("<?xml") and "xmlns=\"http://www.w3.org/2000/svg\"" in text
    assert "onnxruntime-genai model builder" in text and "graphc" in text and "Test CPU" in text
    assert text.count("<circle") == 3  # fp32 is the 0% line, off the chart
    for label in ("int4 default (+37.3%)", "int4 k_quant_mixed (+13.1%)", "int4 (+4.3%)"):
        assert label in text
