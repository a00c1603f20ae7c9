"""Write the generated references docs/cli.md and docs/config.md.

    python scripts/make_docs.py            # (re)write both files
    python scripts/make_docs.py --check    # exit 1 naming a file that differs from the code

The content comes from :mod:`opt.reference`: the ``opt`` argument parser, and the
config dataclasses with the comments beside their fields.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opt.cli import build_parser
from opt.reference import UndocumentedConfigError, cli_reference, config_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    args = parser.parse_args()
    references = {"cli.md": lambda: cli_reference(build_parser()), "config.md": config_reference}
    status = 0
    for name, render in references.items():
        path = DOCS / name
        try:
            text = render()
        except UndocumentedConfigError as error:  # every key needs a comment beside its field in opt/config.py
            print(f"make_docs: cannot generate docs/{name}: {error}", file=sys.stderr)
            status = 1
            continue
        if args.check:
            if not path.is_file() or path.read_text() != text:
                print(f"docs/{name} is stale: run python scripts/make_docs.py")
                return 1
        else:
            path.write_text(text)
            print(f"wrote docs/{name}")
    return status


if __name__ == "__main__":
    sys.exit(main())
