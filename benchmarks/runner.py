"""Run every benchmark module in one process and report the figures against the bars.

``benchmarks/run [NAME ...]`` runs ``run()`` of each ``benchmarks/bench_*.py``
(or only those whose name contains one of NAME), one after another, so all
figures come from the same machine in the same state. A module that raises is
reported and the others still run. Then it:

- prints one table: every row's value, its bar, value/bar and PASS/FAIL;
- writes benchmarks/results.json (the machine, each module's outcome, every row);
- plots foreground latency (rows whose bench starts with "foreground") per kernel
  and mode into benchmarks/foreground-latency.png.

value/bar: the value divided by the bar's number, in the bar's unit. For a bar
that is a multiple ("<= 3x idle") of a row measured in seconds, the module puts
the measured multiple in ``row.extra["ratio"]``. For "<=" bars a value/bar of at
most 1 meets the bar; for ">=" bars at least 1.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import Row, machine  # noqa: E402

RESULTS = HERE / "results.json"
PLOT = HERE / "foreground-latency.png"

_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_MULTIPLE = {"x", "×"}
_BAR = re.compile(r"(<=|>=|<|>|≤|≥)\s*([0-9]*\.?[0-9]+)\s*(ms|us|µs|s|x|×)?")


def bar_ratio(row: Row) -> float | None:
    """The row's value divided by its bar's number, in comparable units; None if not comparable."""
    match = _BAR.search(row.bar)
    if not match:
        return None
    threshold = float(match[2])
    unit = match[3] or row.unit
    if threshold == 0:
        return None
    if unit in _MULTIPLE:
        measured = row.value if row.unit in _MULTIPLE else row.extra.get("ratio")
        return None if measured is None else float(measured) / threshold
    if unit in _SECONDS and row.unit in _SECONDS:
        return row.value * _SECONDS[row.unit] / (threshold * _SECONDS[unit])
    if unit == row.unit:
        return row.value / threshold
    return None


def discover(names: Sequence[str]) -> list[str]:
    modules = sorted(path.stem for path in HERE.glob("bench_*.py"))
    if names:
        modules = [m for m in modules if any(name in m for name in names)]
    return modules


def run_modules(modules: Sequence[str]) -> tuple[list[Row], dict[str, dict[str, object]]]:
    rows: list[Row] = []
    outcomes: dict[str, dict[str, object]] = {}
    for name in modules:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(name)
            produced = list(module.run())
        except Exception as exc:
            traceback.print_exc()
            outcomes[name] = {
                "ok": False,
                "seconds": round(time.perf_counter() - t0, 1),
                "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
            }
            continue
        for row in produced:
            row.extra.setdefault("module", name)
        rows += produced
        outcomes[name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "rows": len(produced)}
    return rows, outcomes


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def table(rows: Sequence[Row], outcomes: dict[str, dict[str, object]]) -> str:
    header = ("bench", "subject", "value", "bar", "value/bar", "")
    lines = [header]
    for row in rows:
        ratio = bar_ratio(row)
        verdict = "" if row.ok is None else ("PASS" if row.ok else "FAIL")
        lines.append(
            (
                row.bench,
                row.subject,
                f"{_fmt(row.value)} {row.unit}",
                row.bar,
                "" if ratio is None else f"{ratio:.2f}",
                verdict,
            )
        )
    for name, outcome in outcomes.items():
        if not outcome["ok"]:
            lines.append((name, "module failed", "", "", "", f"ERROR {outcome['error']}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for i, line in enumerate(lines):
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)]
        out.append("  ".join([*cells, line[-1]]).rstrip())
        if i == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def write_results(rows: Sequence[Row], outcomes: dict[str, dict[str, object]], seconds: float) -> None:
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine(),
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(seconds, 1),
                "modules": outcomes,
                "rows": [asdict(row) for row in rows],
            },
            indent=2,
        )
        + "\n"
    )


def plot_foreground(rows: Sequence[Row], path: Path = PLOT) -> Path | None:
    """Bar chart of foreground latency per kernel and mode, one panel per foreground bench."""
    timed = [r for r in rows if r.bench.startswith("foreground") and r.unit in _SECONDS]
    if not timed:
        print("no foreground latency rows: no plot")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(dict.fromkeys(r.bench for r in timed))
    panels = [[r for r in timed if r.bench == bench] for bench in benches]
    height = 1.2 + sum(0.45 * len(panel) + 0.8 for panel in panels)
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(9, height),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(p) + 1 for p in panels]},
    )
    for ax, bench, panel in zip(axes[:, 0], benches, panels, strict=True):
        values = [r.value * _SECONDS[r.unit] * 1000 for r in panel]
        colours = ["#888888" if r.ok is None else ("#198754" if r.ok else "#dc3545") for r in panel]
        positions = range(len(panel))
        ax.barh(positions, values, color=colours)
        ax.set_yticks(list(positions), [r.subject for r in panel], fontsize=9)
        ax.invert_yaxis()
        if min(values) > 0 and max(values) / min(values) > 30:
            ax.set_xscale("log")
        ax.set_xlim(right=max(values) * (20 if ax.get_xscale() == "log" else 1.6))
        ax.set_xlabel("ms (lower is better)")
        ax.set_title(bench, fontsize=10, loc="left")
        for pos, value, row in zip(positions, values, panel, strict=True):
            label = f" {value:,.0f} ms" if value >= 100 else f" {value:.3g} ms"
            if "ratio" in row.extra:
                label += f"  ({row.extra['ratio']}x idle)"
            if row.bar:
                label += f"  bar {row.bar}"
            ax.text(value, pos, label, va="center", fontsize=8)
    info = machine()
    fig.suptitle(
        "Foreground cell latency while background jobs run\n"
        f"(Python {info['python']}, {info['cpus']} CPUs; grey = reference, green/red = bar met/missed)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="run only modules whose name contains one of these")
    args = parser.parse_args(argv)
    modules = discover(args.names)
    if not modules:
        print(f"no benchmark module matches {args.names}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows, outcomes = run_modules(modules)
    seconds = time.perf_counter() - t0
    print()
    print(table(rows, outcomes))
    write_results(rows, outcomes, seconds)
    print(f"\nwrote {RESULTS.relative_to(HERE.parent)}", end="")
    plot = plot_foreground(rows)
    print(f" and {plot.relative_to(HERE.parent)}" if plot else "")
    failed = [name for name, outcome in outcomes.items() if not outcome["ok"]]
    if failed:
        print(f"modules that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
