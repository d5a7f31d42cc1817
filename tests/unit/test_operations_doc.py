"""The docs keep up with the code: every setting in the README's table, the runbook's sections."""

import re

from consumer.settings import Settings
from tests.unit.deploy_helpers import ROOT

DOC = (ROOT / "docs" / "OPERATIONS.md").read_text()
README = (ROOT / "README.md").read_text()


def test_config_table_lists_every_setting_once() -> None:
    rows = re.findall(r"^\| `(POPSCORE_[A-Z0-9_]+)` \|", README, re.MULTILINE)
    assert sorted(rows) == sorted(f"POPSCORE_{name.upper()}" for name in Settings.model_fields)
    assert not re.search(r"^\| `POPSCORE_", DOC, re.MULTILINE), "one table: the README's"


def test_runbook_has_the_operational_sections() -> None:
    headings = set(re.findall(r"^## (.+)$", DOC, re.MULTILINE))
    assert {"Alerts", "Scaling", "Roll out a model", "Replaying the DLQ"} <= headings
    assert "Configuration" in headings
