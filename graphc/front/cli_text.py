"""The text the ``graphc`` command prints: sizes, escaped names, and the summaries of plans,
``--recipe auto``, validation gates and task figures (cli.py stays the parser and the commands)."""

from __future__ import annotations

from typing import Any

def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def printable(text: str) -> str:
    """Control characters (ESC, BEL, C1, ...) from model names and metadata as escapes, line by
    line: a model must not retitle, clear or recolour the user's terminal."""
    return "\n".join("".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)
                     for line in text.split("\n"))


def field(text: str) -> str:
    """One value on one line: newlines escaped too (a metadata value must not fake a line)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def auto_text(auto: dict) -> str:
    """recipe auto: the candidate table, one line each."""
    shape = auto.get("timed_at") or "x".join(str(x) for x in auto["shape"])
    orig = f", original {auto['original_ms']:.2f} ms" if auto.get("original_ms") is not None else ""
    lines = [f"auto: {auto['winner']} chosen for {auto['target']} at {shape}{orig}"
             f"{'' if auto['timed'] else ' (not timed: the target is not this machine)'}"]
    for c in auto["candidates"]:
        lat = f"{c['latency_ms']:8.2f} ms" if c.get("latency_ms") is not None else "       - ms"
        cos = f"cos {c['output_cosine']:.5f}" if c.get("output_cosine") is not None else ""
        size = fmt_bytes(c["bytes"]) if c.get("bytes") is not None else "-"
        mark = "*" if c["candidate"] == auto["winner"] else " "
        lines.append(f" {mark}{c['candidate']:12s} {c['status']:17s} {lat} {size:>10s} {cos} {c.get('reason', '')}".rstrip())
    return "\n".join(lines)


def plan_text(plan: dict) -> str:
    """The plan pass's decisions and predicted vs measured effect, a few lines."""
    last = (plan.get("rounds") or [{}])[-1]
    orig = plan.get("original") or {}
    kinds: dict[str, int] = {}
    for d in plan.get("decisions", []):
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    pred, meas = last.get("predicted") or {}, last.get("measured") or {}
    lines = [f"plan: {len(plan.get('decisions', []))} actions ({', '.join(f'{k} {v}' for k, v in kinds.items()) or 'none'}), "
             f"{len(plan.get('rounds', []))} round(s); error predicted {last.get('predicted_error', 0):.4g} / measured "
             f"{last.get('measured_error', 0):.4g}; bytes {fmt_bytes(pred.get('bytes', 0))} / "
             f"{fmt_bytes(meas.get('bytes', 0))} (of {fmt_bytes(orig.get('bytes', 0))}); MACs "
             f"{pred.get('macs', 0) / max(orig.get('macs', 1), 1):.3f} / {meas.get('macs', 0) / max(orig.get('macs', 1), 1):.3f}"
             " of the original"]
    lines += [f"  {d['layer']}: {d['action']} (predicted {d['predicted_error']:.3g})"
              for d in plan.get("decisions", []) if d["kind"] not in ("int8", "int4")]
    return "\n".join(lines)


def gate_text(v: Any) -> str:
    """The tolerance the validation was judged by: `` (gate: output cosine ≥ 0.99, ...)``."""
    parts = [f"output cosine ≥ {v.min_output_cosine_required:g}" if v.min_output_cosine_required is not None else "",
             f"worst row cosine ≥ {v.min_cosine_required:g}" if v.min_cosine_required is not None else "",
             f"max abs ≤ {v.max_abs_allowed:g}" if v.max_abs_allowed is not None else "",
             f"max relative difference ≤ {v.max_rel_allowed:g}" if getattr(v, "max_rel_allowed", None) is not None else "",
             f"perplexity rise ≤ {v.max_ppl_rise_allowed:.1%}" if getattr(v, "max_ppl_rise_allowed", None) is not None else "",
             # the embedding / top-1 gates where validation measured them (as the report applied them)
             *(f"{what} {op} {limit:g}" for what, op, limit, _ in (v.task_gates() if hasattr(v, "task_gates") else [])
               if what != "perplexity rise")]
    parts = [p for p in parts if p]
    return f" (gate: {', '.join(parts)})" if parts else ""


def task_text(task: dict) -> str:
    """One line for a model spec's task figures (perplexity, embedding cosine, ...)."""
    metric = task.get("metric", "task")
    if "reference" in task and "value" in task:
        rise = f" ({task['relative_rise']:+.1%})" if isinstance(task.get("relative_rise"), (int, float)) else ""
        return f"{metric} {task['reference']:.4g} → {task['value']:.4g}{rise}"
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in task.items() if k != "metric")
    return f"{metric}: {shown}"


def short(text: str, limit: int = 100) -> str:
    """A metadata value on one terminal line: control characters escaped (``field``), long
    values cut with their length."""
    shown = field(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}… ({len(text):,} chars)"
