"""docs/OPERATIONS.md keeps up with the code: every setting in its table, every alert a section."""

import re

from consumer.settings import Settings
from tests.unit.deploy_helpers import ROOT

DOC = (ROOT / "docs" / "OPERATIONS.md").read_text()


def test_config_table_lists_every_setting() -> None:
    table = set(re.findall(r"^\| `(POPSCORE_[A-Z0-9_]+)` \|", DOC, re.MULTILINE))
    assert table == {f"POPSCORE_{name.upper()}" for name in Settings.model_fields}


def test_runbook_has_the_operational_sections() -> None:
    headings = set(re.findall(r"^## (.+)$", DOC, re.MULTILINE))
    assert {"Alerts", "Scaling", "Rolling out a new model", "Replaying the DLQ"} <= headings
    assert "Configuration" in headings
