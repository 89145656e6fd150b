"""Where a `graphc compress` run spends its time: the command under cProfile.

    python bench/profile_compress.py [--top 40] [--out run.prof] -- compress IN -o OUT --recipe int4 ...

Runs the graphc command line (everything after ``--``) in this process under Python's profiler
and prints the wall time, the CPU and the ``--top`` functions by cumulative time (ONNX Runtime's
own work shows as the waits of ``graphc.core.interrupt.run_session`` and the calls that build
sessions). The profiler adds ~10% to Python-heavy parts; compare runs under it with each other.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", metavar="PROF", help="also keep the profile (pstats format)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then graphc's arguments")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give graphc's arguments after --")

    from graphc.core.target import cpu_line
    from graphc.front.cli import main as graphc_main

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    try:
        code = graphc_main(command)
    finally:
        profile.disable()
    wall = time.perf_counter() - start
    if args.out:
        profile.dump_stats(args.out)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.top)
    print(f"{cpu_line()}\ngraphc {' '.join(command)}: exit {code}, {wall:.1f} s under the profiler\n")
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
