"""Measurement helpers shared by the benchmark and the demo.

- latency: median wall time of ONNX Runtime sessions on one feed, with warm-up, the models
  interleaved (each repetition runs every model once, in rotating order) so that machine
  drift hits all of them equally;
- embeddings: sentence embeddings of an encoder (mean pooling over the attention mask,
  then L2 normalisation) and cosine statistics of one set against a reference;
- probe: a logistic-regression probe trained on reference embeddings and scored on others;
- perplexity: token-weighted next-token perplexity of a causal LM over fixed token windows,
  from ORT logits or any callable (the PyTorch fp32 reference through the same windows).

Library code: nothing here prints. Long loops report through an optional
``progress(done, total)`` callback. scikit-learn is imported only by the probe helpers.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from graphc.core.errors import ValidationError

Feed = Mapping[str, np.ndarray]
Progress = Callable[[int, int], None]
Pool = Callable[[np.ndarray, np.ndarray], np.ndarray]

DEFAULT_THREADS = 2


# --------------------------------------------------------------------------- sessions


def session(model: str | os.PathLike | bytes, *, threads: int = DEFAULT_THREADS) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads, one inter-op thread and full graph
    optimisation (ORT's default level), for a path or serialized model bytes."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads otherwise spin for a while after each run and steal the cores from
    # the next model in an interleaved benchmark (measured: every model ~1.5x slower, unevenly).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model if isinstance(model, bytes) else os.fspath(model)
    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(f"ONNX Runtime cannot load the model: {first}") from None


def feed_for(sess: ort.InferenceSession, feed: Feed) -> dict[str, np.ndarray]:
    """``feed`` restricted to the session's inputs (a model without token_type_ids, say)."""
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in feed]
    if missing:
        raise ValidationError(f"the feed lacks model input(s) {', '.join(missing)}")
    return {n: np.ascontiguousarray(feed[n]) for n in names}


def files_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of an .onnx file plus the external-data files beside it that it names."""
    import onnx

    path = Path(path)
    total = path.stat().st_size
    proto = onnx.load(os.fspath(path), load_external_data=False)
    seen: set[str] = set()
    for init in _all_initializers(proto.graph):
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in init.external_data if e.key == "location"), None)
            if loc and loc not in seen:
                seen.add(loc)
                f = path.parent / loc
                if f.is_file():
                    total += f.stat().st_size
    return total


def _all_initializers(graph: Any):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.ByteSize():
                yield from _all_initializers(attr.g)
            for g in attr.graphs:
                yield from _all_initializers(g)


def pad_feed(feed: Feed, length: int, pad_values: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Right-pad every 2-D input of ``feed`` along axis 1 to ``length`` (0 by default:
    BERT's [PAD] id, a masked position, token type 0); longer inputs are an error."""
    pad_values = pad_values or {}
    out = {}
    for name, arr in feed.items():
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[1] != length:
            if arr.shape[1] > length:
                raise ValueError(f"input {name!r} is {arr.shape[1]} long, more than {length}")
            arr = np.pad(arr, ((0, 0), (0, length - arr.shape[1])), constant_values=pad_values.get(name, 0))
        out[name] = np.ascontiguousarray(arr)
    return out


# --------------------------------------------------------------------------- latency


@dataclass
class Latency:
    """Wall-time statistics of one model on one feed, in milliseconds."""

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    reps: int
    warmup: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def latency_stats(times_s: Sequence[float], warmup: int = 0) -> Latency:
    if not times_s:
        raise ValueError("no timings")
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    return Latency(
        median_ms=float(statistics.median(ms.tolist())),
        mean_ms=float(ms.mean()),
        p10_ms=float(np.percentile(ms, 10)),
        p90_ms=float(np.percentile(ms, 90)),
        min_ms=float(ms.min()),
        reps=len(ms),
        warmup=warmup,
    )


def interleaved_latency(
    sessions: Mapping[str, ort.InferenceSession],
    feed: Feed | Mapping[str, Feed],
    *,
    reps: int = 20,
    warmup: int = 3,
    progress: Progress | None = None,
) -> dict[str, Latency]:
    """Median latency of each session on ``feed``, the sessions interleaved.

    ``feed`` is one feed for all, or a mapping from session name to its own feed. Every
    session first runs ``warmup`` untimed times; then each of ``reps`` repetitions runs every
    session once, the starting session rotating from one repetition to the next.
    """
    if reps < 1:
        raise ValueError("reps must be >= 1")
    names = list(sessions)
    per_model = bool(feed) and all(isinstance(v, Mapping) for v in feed.values())
    if per_model and any(n not in feed for n in names):
        raise ValueError(f"no feed for {', '.join(n for n in names if n not in feed)}")
    feeds = {n: feed_for(sessions[n], feed[n] if per_model else feed) for n in names}  # type: ignore[arg-type]
    total = warmup * len(names) + reps * len(names)
    done = 0
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, feeds[n])
            done += 1
            if progress:
                progress(done, total)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            sess, f = sessions[n], feeds[n]
            t0 = time.perf_counter()
            sess.run(None, f)
            times[n].append(time.perf_counter() - t0)
            done += 1
            if progress:
                progress(done, total)
    return {n: latency_stats(times[n], warmup) for n in names}


# --------------------------------------------------------------------------- embeddings


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors over the attention mask, then L2-normalised (float64)."""
    h = np.asarray(last_hidden_state, dtype=np.float64)
    m = np.asarray(attention_mask, dtype=np.float64)[..., None]
    pooled = (h * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    norm = np.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / np.clip(norm, 1e-12, None)


def embeddings(
    runner: ort.InferenceSession | Callable[[Feed], np.ndarray],
    feeds: Sequence[Feed],
    *,
    pool: Pool = mean_pool,
    output: int | str = 0,
    progress: Progress | None = None,
) -> np.ndarray:
    """Pooled sentence embeddings, one row per text, over all feeds.

    ``runner`` is an ORT session (its output ``output`` is the hidden state) or a callable
    mapping a feed to the hidden state (a torch model, say). ``pool`` takes the hidden state
    and the feed's attention mask.
    """
    rows = []
    if isinstance(runner, ort.InferenceSession):
        out_names = [o.name for o in runner.get_outputs()]
        index = out_names.index(output) if isinstance(output, str) else output
    for i, feed in enumerate(feeds):
        if isinstance(runner, ort.InferenceSession):
            hidden = runner.run(None, feed_for(runner, feed))[index]
        else:
            hidden = runner(feed)
        rows.append(pool(np.asarray(hidden), feed["attention_mask"]))
        if progress:
            progress(i + 1, len(feeds))
    return np.concatenate(rows, axis=0) if rows else np.zeros((0, 0))


@dataclass
class CosineStats:
    """Row-wise cosine of embeddings against reference embeddings."""

    mean: float
    min: float
    p01: float  # 1st percentile
    count: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def row_cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise ValidationError(f"embeddings of shape {got.shape} vs reference {ref.shape}")
    num = (got * ref).sum(axis=-1)
    den = np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.clip(cos, -1.0, 1.0)


def cosine_stats(got: np.ndarray, ref: np.ndarray) -> CosineStats:
    cos = row_cosines(got, ref)
    if cos.size == 0:
        raise ValueError("no embeddings")
    return CosineStats(float(cos.mean()), float(cos.min()), float(np.percentile(cos, 1)), int(cos.size))


# --------------------------------------------------------------------------- probe


def train_probe(x: np.ndarray, y: np.ndarray, *, seed: int = 0, max_iter: int = 1000) -> Any:
    """A logistic-regression probe (scikit-learn, default regularisation) fitted on
    reference embeddings; models with a recipe may bring their own (anything with ``predict``)."""
    from sklearn.linear_model import LogisticRegression

    probe = LogisticRegression(max_iter=max_iter, random_state=seed)
    probe.fit(np.asarray(x, dtype=np.float64), np.asarray(y))
    return probe


def probe_accuracy(probe: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a fitted probe (anything with ``predict``) on embeddings ``x``."""
    pred = probe.predict(np.asarray(x, dtype=np.float64))
    return float((np.asarray(pred) == np.asarray(y)).mean())


def majority_accuracy(y: np.ndarray) -> float:
    y = np.asarray(y)
    if y.size == 0:
        return 0.0
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / y.size)


# --------------------------------------------------------------------------- perplexity


@dataclass
class Perplexity:
    """Token-weighted perplexity of a causal LM over fixed windows: exp(mean next-token NLL)."""

    perplexity: float
    mean_nll: float  # nats per predicted token
    tokens: int  # predicted tokens (each window of n tokens predicts n - 1)
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def token_nll(
    logits: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats, float64) and the number of predicted
    tokens: position t's logits score token t + 1; a target counts when it and the position
    predicting it are both unmasked. Row by row, so a [batch, seq, vocab] float32 block is
    never copied whole."""
    logits = np.asarray(logits)
    ids = np.asarray(input_ids)
    if logits.ndim != 3 or logits.shape[:2] != ids.shape:
        raise ValidationError(f"logits of shape {logits.shape} do not match input_ids of shape {ids.shape}")
    keep = np.ones(ids.shape, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    keep = keep[:, 1:] & keep[:, :-1]
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        rows = logits[b, :-1][keep[b]].astype(np.float32, copy=False)
        if rows.size == 0:
            continue
        targets = ids[b, 1:][keep[b]]
        peak = rows.max(axis=-1)
        log_z = np.log(np.exp(rows - peak[:, None]).sum(axis=-1, dtype=np.float64)) + peak
        picked = rows[np.arange(len(targets)), targets]
        total += float((log_z - picked).sum(dtype=np.float64))
        count += int(targets.size)
    return total, count


def perplexity(
    runner: ort.InferenceSession | Callable[[Feed], np.ndarray],
    feeds: Sequence[Feed],
    *,
    output: int | str = 0,
    progress: Progress | None = None,
) -> Perplexity:
    """Perplexity of a causal LM on ``feeds`` (each with ``input_ids``, optionally
    ``attention_mask``), token-weighted over all windows.

    ``runner`` is an ORT session (its output ``output`` holds the logits) or a callable
    mapping a feed to logits (a torch model, say: the fp32 reference through the same windows).
    """
    if not feeds:
        raise ValidationError("perplexity needs at least one feed of token windows")
    if isinstance(runner, ort.InferenceSession):
        out_names = [o.name for o in runner.get_outputs()]
        index = out_names.index(output) if isinstance(output, str) else output
    total, count, windows = 0.0, 0, 0
    for i, feed in enumerate(feeds):
        if isinstance(runner, ort.InferenceSession):
            logits = runner.run(None, feed_for(runner, feed))[index]
        else:
            logits = runner(feed)
        nll, n = token_nll(logits, feed["input_ids"], feed.get("attention_mask"))
        total += nll
        count += n
        windows += int(np.asarray(feed["input_ids"]).shape[0])
        if progress:
            progress(i + 1, len(feeds))
    if count == 0:
        raise ValidationError("the feeds hold no token to predict (windows of one token, or all masked)")
    mean = total / count
    return Perplexity(float(np.exp(mean)), mean, count, windows)


def relative_rise(value: float, reference: float) -> float:
    """(value - reference) / reference: +0.05 is 5% above the reference."""
    return (value - reference) / reference
