import subprocess
import sys

import pytest

from register_adapter.cli import main


def test_unknown_command_exits_2_with_usage(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "register-adapter: unknown command 'frobnicate'\n\nusage: register-adapter {demo,train,distill,diagnose,find-neurons} ..."
    )


@pytest.mark.slow
def test_console_script_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "register_adapter.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "  demo          add registers to a model, train them a few steps, save and reload" in result.stdout


@pytest.mark.slow
def test_help_and_import_load_no_model_code():
    """`register-adapter --help` answers without importing torch, transformers or peft (they take seconds), and
    `import register_adapter` alone arms the PEFT method for when peft is imported."""
    code = (
        "import sys\n"
        "from register_adapter.cli import main\n"
        "main(['--help'])\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
        "import peft.mapping, register_adapter\n"
        "print(peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[register_adapter.REGISTERS].__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["[]", "RegisterModel"]
