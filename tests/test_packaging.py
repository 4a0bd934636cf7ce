"""A wheel holds every package of the source tree: setup.cfg lists them one by one."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package_of_the_source_tree():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "register_adapter").rglob("__init__.py")}
    assert listed == found | {"register_adapter.model_cards"}
    assert (ROOT / "model_cards" / "adapter_card.md").is_file()
