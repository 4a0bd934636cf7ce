"""A wheel holds every package of the source tree: setup.cfg lists them one by one."""

import configparser
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package_of_the_source_tree():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "register_adapter").rglob("__init__.py")}
    assert listed == found | {"register_adapter.model_cards"}
    assert (ROOT / "model_cards" / "adapter_card.md").is_file()


def test_the_public_names_are_sorted_and_each_is_importable():
    import register_adapter

    assert register_adapter.__all__ == sorted(register_adapter.__all__)
    assert set(register_adapter.__all__) == {*register_adapter._EXPORTS, "__version__"}
    for name in register_adapter.__all__:
        getattr(register_adapter, name)


def is_module(path: str) -> bool:
    try:
        importlib.import_module(path)
    except ModuleNotFoundError:
        return False
    return True


def api_table_names() -> list[tuple[str, str]]:
    """(module, name) of every name in the first column of the README's API table. A span that starts with
    ``register_adapter.`` names a module, or an attribute of one; the names after it in that cell belong to it."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## API\n", 1)[1].split("\n\n", 1)[0]
    found = []
    for row in table.splitlines()[2:]:
        module = "register_adapter"
        for span in re.findall(r"`([^`]+)`", row.split("|")[1]):
            name = span.split("(")[0].strip()
            if name.startswith("register_adapter."):
                module, _, name = name.rpartition(".")
                if is_module(f"{module}.{name}"):  # the names after it are in it
                    module, name = f"{module}.{name}", None
            if name:
                found.append((module, name))
    return found


def test_every_name_in_the_readme_api_table_is_importable():
    names = api_table_names()
    assert ("register_adapter.hub", "push_to_hub") in names and ("register_adapter.metrics", "CorLoc") in names
    missing = [f"{module}.{name}" for module, name in names if not hasattr(importlib.import_module(module), name)]
    assert missing == []
