"""Loading a model by name (a folder, a Hub id, a built-in tiny model, planted:<family>) with its image processor."""

import logging
import re

import pytest

from register_adapter.errors import InvalidConfigError
from register_adapter.loading import load_model
from register_adapter.tiny import build_tiny_model


def test_a_model_saved_without_an_image_processor_gets_the_default_one_and_says_so(tmp_path, caplog):
    build_tiny_model("tiny-dinov2").save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="register_adapter.loading"):
        _, processor = load_model(str(tmp_path))
    assert (processor.size["height"], processor.size["width"]) == (30, 30)
    assert caplog.messages == [
        f"No image processor found for {tmp_path}; resizing to 30x30 px (height x width), mean = std = 0.5."
    ]


@pytest.mark.parametrize("name", ["./no/model", "no-model/", "~/no-model"])
def test_a_model_path_that_does_not_exist_is_reported_as_a_missing_folder(name):
    message = (
        f"Cannot load model '{name}': no such folder. Give a folder saved with save_pretrained, a Hub id, a built-in "
        "tiny model (tiny-vit, ...) or planted:<family>."
    )
    with pytest.raises(InvalidConfigError, match=f"^{re.escape(message)}$"):
        load_model(name)
