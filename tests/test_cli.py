import subprocess
import sys

from register_adapter.cli import main


def test_unknown_command_exits_2_with_usage(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "register-adapter: unknown command 'frobnicate'\n\nusage: register-adapter {demo,train,diagnose} ..."
    )


def test_console_script_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "register_adapter.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "  demo       add registers to a model, train them a few steps, save and reload" in result.stdout
