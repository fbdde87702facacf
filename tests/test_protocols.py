from pathlib import Path

import pytest

from protocols.schemas import CONTRACTS, schema_text

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


@pytest.mark.parametrize("name", CONTRACTS)
def test_published_json_schema_is_current(name):
    published = DOCS / f"{name}.schema.json"
    assert published.read_text() == schema_text(CONTRACTS[name]), (
        f"{published} is stale: run `python -m protocols.schemas docs/schemas`")


def test_protocols_imports_neither_side_and_nothing_shipped_imports_the_harness():
    root = Path(__file__).resolve().parents[1]
    for package, forbidden in (("protocols", ("trainer", "edge", "harness")), ("edge", ("trainer", "harness")),
                               ("trainer", ("harness",))):
        for path in (root / package).rglob("*.py"):
            for line in path.read_text().splitlines():
                stripped = line.strip()
                assert not any(stripped.startswith((f"import {f}", f"from {f}")) for f in forbidden), (path, line)
