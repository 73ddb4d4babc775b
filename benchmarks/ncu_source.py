r"""Where a kernel's instructions go: a summary of Nsight Compute's source view (SASS, or CUDA / Python lines).

A kernel bound by what it issues (few stalls, one issue every few cycles) is made faster only by issuing less;
this shows which instructions and which source lines issue most. From a report with the SourceCounters section:
  ncu --profile-from-start off --kernel-name regex:fwd --section SourceCounters --section InstructionStats \
      --import-source yes -o fwd python benchmarks/ncu_mixed_attention.py --method "cuda[sm90overlap+sm90]"
  ncu -i fwd.ncu-rep --page source --csv --print-source sass > fwd_sass.csv
  python benchmarks/ncu_source.py fwd_sass.csv --json fwd_sass.json
Prints the executed instructions in total, their share by opcode (predicate and modifiers dropped: HMMA, FFMA,
FMNMX, ...; the wgmma is HGMMA), and the top instructions (or lines) by executed instructions and by stall samples.
(gpu_suite.sh's part `ncu_source` does all three steps for every NCU_METHODS entry.)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import Counter

EXECUTED = ("Instructions Executed", "inst_executed")  # the column's name in ncu's source view, by version
STALLS = ("Warp Stall Sampling (All Samples)", "Warp Stall Sampling (All Cycles)", "Sampling Data (All)")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text else 0.0
    except ValueError:
        return 0.0


def _column(header, names):
    for name in names:
        for i, h in enumerate(header):
            if h.strip() == name:
                return i
    for name in names:  # a version that decorates the name
        for i, h in enumerate(header):
            if name.lower() in h.lower():
                return i
    return None


def read_rows(path: str):
    """[(source text, instructions executed, stall samples)] of every kernel in the CSV (concatenated)."""
    text = open(path, encoding="utf-8", errors="replace").read()
    rows, header = [], None
    for record in csv.reader(io.StringIO(text)):
        if not record:
            continue
        if any(h.strip() == "Source" for h in record) and _column(record, EXECUTED) is not None:
            header = record
            source, executed, stalls = record.index("Source"), _column(record, EXECUTED), _column(record, STALLS)
            continue
        if header is None or len(record) < len(header):
            continue
        rows.append((record[source].strip(), _number(record[executed]),
                     _number(record[stalls]) if stalls is not None else 0.0))
    if not rows:
        raise SystemExit(f"{path}: no source-view rows with an executed-instructions column (ncu's output: "
                         f"{text[:300]!r})")
    return rows


def opcode(sass: str) -> str:
    """'@!P0 HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24' -> 'HGMMA'."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return re.split(r"[.\s]", words[0])[0] if words else "?"


def summarize(rows, top: int = 25, sass: bool = True) -> dict:
    total = sum(r[1] for r in rows) or 1.0
    stalls = sum(r[2] for r in rows) or 1.0
    summary = {"instructions_executed": total, "stall_samples": stalls, "rows": len(rows)}
    if sass:
        by_op = Counter()
        for text, executed, _ in rows:
            by_op[opcode(text)] += executed
        summary["by_opcode"] = {op: {"executed": n, "share": n / total} for op, n in by_op.most_common()}
    for key, column in (("top_executed", 1), ("top_stalled", 2)):
        summary[key] = [{"source": t[:120], "executed": e, "share": e / total, "stall_share": s / stalls}
                        for t, e, s in sorted(rows, key=lambda r: -r[column])[:top]]
    return summary


def print_summary(summary: dict, name: str) -> None:
    print(f"== {name}: {summary['instructions_executed']:.4g} warp instructions executed, "
          f"{summary['rows']} source rows")
    if "by_opcode" in summary:
        shares = [f"{op} {v['share']:.1%}" for op, v in list(summary["by_opcode"].items())[:16]]
        print("  by opcode: " + ", ".join(shares))
    print("  top by executed (share of instructions, of stall samples):")
    for r in summary["top_executed"][:12]:
        print(f"    {r['share']:6.2%} {r['stall_share']:6.2%}  {r['source']}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass (or cuda) output")
    parser.add_argument("--lines", action="store_true", help="the rows are source lines (CUDA / Python), not SASS")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    summary = summarize(read_rows(args.csv), args.top, sass=not args.lines)
    print_summary(summary, args.csv)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
