"""`umtrain count CONFIG [key.path=value ...] [--json]`: parameters and FLOPs per token as the paper counts them."""

from __future__ import annotations

import argparse
import json

from umtrain.config import load_config
from umtrain.model.accounting import Accounting, PaperComparison, compare_to_paper, count

HEADLINE = (
    ("dense_params", "dense params", "B"),
    ("sparse_params", "sparse params", "B"),
    ("total_params", "total params", "B"),
    ("activated_params", "activated params", "B"),
    ("flops_per_token", "FLOPs per token", "G"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "count", help="dense / sparse / activated parameters and FLOPs per token (paper convention)",
        description="Count non-embedding parameters and FLOPs per token as the UltraMem paper does "
                    "(docs/accounting.md). Paper configs also show the paper's figures and the relative error.")
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    parser.add_argument("--json", action="store_true", help="print one JSON object of plain numbers")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides, check_files=False)
    accounting = count(config)
    if args.json:
        print(json.dumps(accounting.summary()))
    else:
        comparisons = compare_to_paper(accounting, config.run_name)
        print(format_report(config.run_name, accounting, comparisons))
        if args.overrides and comparisons:
            print("\nnote: overrides were applied; the paper's figures are those of the unmodified config")
    return 0


def _giga(value: float) -> str:
    return f"{value / 1e9:.4f}"


def _mega(value: float) -> str:
    return f"{value / 1e6:.3f}"


def format_report(run_name: str, accounting: Accounting, comparisons: list[PaperComparison]) -> str:
    """Headline numbers (with the paper's and the relative error for paper runs) and the per-component split."""
    paper = {c.field: c for c in comparisons}
    lines = [run_name, f"{'':18}{'count':>12}{'paper':>12}{'rel. err':>10}"]
    for field, label, unit in HEADLINE:
        value = getattr(accounting, field)
        row = f"{label:18}{_giga(value) + ' ' + unit:>12}"
        if field in paper:
            row += f"{_giga(paper[field].paper) + ' ' + unit:>12}{paper[field].relative_error:>+10.2%}"
        lines.append(row)
    lines += ["", f"{'component':28}{'params':>14}{'activated':>14}{'FLOPs/token':>14}"]
    for c in accounting.components:
        name = c.name + (" (sparse)" if c.sparse else "")
        lines.append(f"{name:28}{_mega(c.params) + ' M':>14}{_mega(c.activated_params) + ' M':>14}"
                     f"{_mega(c.flops_per_token) + ' M':>14}")
    return "\n".join(lines)
