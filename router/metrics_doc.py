"""docs/metrics.md, generated from the metrics a freshly built app declares.

The app is built as ``kvroute serve`` builds it (from an empty config, nothing
started), so a metric registered anywhere on its way shows up here; the table
lists ``Metrics.families()``: name, type, labels and help of every family.
tests/test_metrics_doc.py fails when the file and the code disagree.

    .venv/bin/python -m router.metrics_doc --write     # rewrite docs/metrics.md
    .venv/bin/python -m router.metrics_doc --check     # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from router.metrics import Family

DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
COMMAND = ".venv/bin/python -m router.metrics_doc --write"

HEADER = f"""# Metrics reference

Every metric kvroute exposes on `GET /metrics` (Prometheus text format).
This file is generated from the code by
`{COMMAND}`;
a test fails when it is out of date, so do not edit it by hand. Counters are
listed with their `_total` suffix; a histogram's series are `<name>_bucket`, `<name>_sum` and
`<name>_count`. Each counter and histogram child also has a `<name>_created` series
(prometheus-client's: when that label set was first used, in Unix seconds), not
listed. Labels hold configured names (models, endpoints, tenants,
discovery sources) or fixed sets of values, never what a client or a backend
wrote. How kvroute's own overhead is measured: README, "Observability".

| name | type | labels | meaning |
|---|---|---|---|
"""


def app_families() -> list[Family]:
    """The families of an app built from an empty config (no I/O, nothing started)."""
    from router.app import build_app
    from router.config import parse_config

    return build_app(parse_config("{}", {})).state.metrics.families()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(families: Sequence[Family]) -> str:
    rows = []
    for f in sorted(families, key=lambda f: f.exposed):
        labels = ", ".join(f"`{label}`" for label in f.labels)
        rows.append(f"| `{f.exposed}` | {f.kind.value} | {labels} | {_cell(f.help)} |\n")
    return HEADER + "".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", action="store_true", help=f"rewrite {DOC.name}")
    what.add_argument("--check", action="store_true", help=f"exit 1 if {DOC.name} is stale")
    args = parser.parse_args(argv)
    text = render(app_families())
    if args.write:
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
        return 0
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
