import pytest

from register_adapter.errors import IncompatibleVersionsError, RegisterAdapterError
from register_adapter.peft_integration import check_versions


def test_transformers_that_refuses_the_installed_peft_is_one_clear_error():
    with pytest.raises(IncompatibleVersionsError) as raised:
        check_versions("5.25.0", "0.21.2")
    assert isinstance(raised.value, RegisterAdapterError) and isinstance(raised.value, ImportError)
    assert str(raised.value) == (
        "transformers 5.25.0 and peft 0.21.2 do not work together: transformers' add_adapter / load_adapter refuse "
        "this peft (it needs peft >= 0.22). Install the tested set: pip install 'transformers<5.24' peft==0.21.2 (or "
        "`make install`, which uses constraints.txt), or a peft >= 0.22 once register_adapter supports it."
    )


@pytest.mark.parametrize(("transformers_version", "peft_version"), [("5.23.0", "0.21.2"), ("5.24.0", "0.22.0")])
def test_compatible_versions_pass(transformers_version, peft_version):
    check_versions(transformers_version, peft_version)


def test_the_installed_versions_pass():
    check_versions()
