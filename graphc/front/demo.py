"""``python -m graphc.front.demo`` (what ``make demo`` runs): MiniLM end to end.

Exports all-MiniLM-L6-v2 (cached in ``.graphc-cache/demo/``), compresses it with the
``int8`` recipe through the Python API, and reports on real tweets: bytes, latency at
batch 8 × 128 tokens on 2 threads, cosine of the pooled sentence embeddings against fp32,
and the accuracy of a sentiment probe trained on fp32 embeddings. Takes a minute or two.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CACHE = Path(".graphc-cache")
THREADS = 2
SEQ = 128


# --------------------------------------------------------------------------- cached export


def _fingerprint(name: str) -> str:
    """What an export depends on: the exporter and model-recipe sources and library versions."""
    import graphc.exporters
    import graphc.models

    h = hashlib.sha256(name.encode())
    for pkg in (graphc.exporters, graphc.models):
        folder = Path(pkg.__file__).parent
        for f in sorted(folder.glob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for dist in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir"):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=none".encode())
    return h.hexdigest()[:16]


def cached_export(name: str, folder: str | os.PathLike, *, fresh: bool = False,
                  progress: Callable[[str], None] | None = None) -> tuple[Path, bool]:
    """Export model spec ``name`` with graphc's exporter to ``folder/<name>-fp32.onnx``,
    reusing an earlier export made by the same exporter sources and library versions.

    Returns (path, whether it came from the cache).
    """
    from graphc.exporters import export
    from graphc.models import get_model_spec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-fp32.onnx"
    stamp = folder / f"{name}-fp32.key"
    key = _fingerprint(name)
    if not fresh and path.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        return path, True
    stamp.unlink(missing_ok=True)
    export(get_model_spec(name), path, progress=progress)
    stamp.write_text(key + "\n")
    return path, False


def length_sorted(recipe, texts, labels=None, *, max_length: int = SEQ):
    """``texts`` (and ``labels``) ordered by token count, so that batches padded to their
    longest text waste little compute on padding (tweets vary from 5 to 100 tokens)."""
    import numpy as np

    ids = recipe.tokenizer()(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    texts = [texts[i] for i in order]
    return texts if labels is None else (texts, np.asarray(labels)[order])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- demo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphc.front.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="export again even if a cached export exists")
    parser.add_argument("--sentences", type=int, default=256, help="eval tweets for the cosine check (default 256)")
    parser.add_argument("--reps", type=int, default=12, help="latency repetitions (default 12)")
    parser.add_argument("--probe-train", type=int, default=2000, help="probe training tweets (default 2000, at most 4000)")
    parser.add_argument("--probe-test", type=int, default=1000, help="probe test tweets (default 1000, at most 2000)")
    args = parser.parse_args(argv)

    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich comes with transformers (via typer)
        print("the demo needs rich (pip install rich)", file=sys.stderr)
        return 1

    import graphc
    from graphc.checks import measure
    from graphc.core.errors import GraphcError

    console = Console()
    if not console.is_terminal:  # piped or logged: wider than the default 80 columns
        console = Console(width=110)
    err = Console(stderr=True)

    @contextmanager
    def step(text: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with err.status(text):
            yield
        console.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - t0:.1f} s)[/]")

    try:
        from graphc.models import data, get_model_spec
        from graphc.models.minilm import SentimentProbe, embed

        recipe = get_model_spec("minilm")
        folder = CACHE / "demo"
        console.rule("[bold]graphc demo: all-MiniLM-L6-v2 → int8")

        t0 = time.perf_counter()
        with err.status("exporting MiniLM with torch.onnx (dynamo)…"):
            fp32_path, cached = cached_export("minilm", folder, fresh=args.fresh)
        console.print(f"[green]✓[/] exported {fp32_path} "
                      f"[dim]({'cached' if cached else f'{time.perf_counter() - t0:.1f} s'})[/]")

        int8_path = folder / "minilm-int8.onnx"
        with step("compressed with recipe int8 (graphc.compress)"):
            result = graphc.compress(fp32_path, int8_path, recipe="int8", force=True)
        for rec in result.passes:
            if rec.modified:
                stats = ", ".join(f"{k}={v}" for k, v in rec.stats.items() if not isinstance(v, (dict, list)))
                console.print(f"    [cyan]{rec.name:<20}[/] {stats}")
        v = result.validation
        if v is not None:
            verdict = "[green]passed[/]" if v.passed else "[red]MISSED[/] (written anyway for the demo)"
            console.print(f"    validation on {v.input_source}: output cosine {v.output_cosine:.5f}, "
                          f"worst token cosine {v.min_cosine:.4f} → {verdict}")

        sessions = {"fp32": measure.session(fp32_path, threads=THREADS),
                    "int8": measure.session(int8_path, threads=THREADS)}
        sizes = {"fp32": measure.files_bytes(fp32_path), "int8": sum(p.stat().st_size for p in result.written)}

        with step(f"latency: batch 8 × {SEQ} tokens, {THREADS} threads, {args.reps} interleaved runs"):
            texts8 = recipe.eval_texts(8)
            feed8 = measure.pad_feed(recipe.feeds(texts8, batch=8, max_length=SEQ)[0], SEQ)
            lat = measure.interleaved_latency(sessions, feed8, reps=args.reps, warmup=2)

        with step(f"pooled embeddings of {args.sentences} eval tweets"):
            feeds = recipe.feeds(recipe.eval_texts(args.sentences), batch=32, max_length=SEQ)
            emb = {k: measure.embeddings(s, feeds, pool=embed) for k, s in sessions.items()}
            cos = measure.cosine_stats(emb["int8"], emb["fp32"])

        n_train, n_test = min(args.probe_train, data.PROBE_TRAIN), min(args.probe_test, data.PROBE_TEST)
        with step(f"sentiment probe: trained on fp32 embeddings of {n_train} tweets, tested on {n_test}"):
            train_texts, train_y = data.tweets("probe_train")
            test_texts, test_y = data.tweets("probe_test")
            train_texts, train_y = length_sorted(recipe, train_texts[:n_train], train_y[:n_train])
            test_texts, test_y = length_sorted(recipe, test_texts[:n_test], test_y[:n_test])
            train_feeds = recipe.feeds(train_texts, batch=32, max_length=SEQ)
            test_feeds = recipe.feeds(test_texts, batch=32, max_length=SEQ)
            probe = SentimentProbe().fit(measure.embeddings(sessions["fp32"], train_feeds, pool=embed), train_y)
            acc = {k: measure.probe_accuracy(probe, measure.embeddings(s, test_feeds, pool=embed), test_y)
                   for k, s in sessions.items()}
    except GraphcError as e:
        err.print(f"[red]error:[/] {e}")
        return 1

    table = Table(title="MiniLM fp32 vs graphc int8 (ONNX Runtime CPU)", title_justify="left")
    table.add_column("")
    table.add_column("fp32", justify="right")
    table.add_column("int8", justify="right")
    table.add_column("int8 / fp32", justify="right")
    table.add_row("size on disk", mib(sizes["fp32"]), mib(sizes["int8"]), f"{sizes['int8'] / sizes['fp32']:.2f}×")
    f, q = lat["fp32"].median_ms, lat["int8"].median_ms
    table.add_row(f"latency b8×{SEQ} (median)", f"{f:.1f} ms", f"{q:.1f} ms", f"{q / f:.2f}× ({f / q:.2f}× faster)")
    table.add_row(f"embedding cosine vs fp32 ({cos.count} tweets)", "reference", f"mean {cos.mean:.5f}", f"min {cos.min:.4f}")
    table.add_row("sentiment probe accuracy", f"{acc['fp32']:.4f}", f"{acc['int8']:.4f}",
                  f"{(acc['int8'] - acc['fp32']) * 100:+.2f} pts")
    console.print()
    console.print(table)
    console.print(f"[dim]majority class: {measure.majority_accuracy(test_y):.4f}; files in {folder}/; "
                  f"onnxruntime {importlib.metadata.version('onnxruntime')}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
