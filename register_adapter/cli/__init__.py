"""``register-adapter``: the command line.

    register-adapter demo [--model NAME_OR_PATH] [--steps N] [--out DIR]
    register-adapter train --model M --train_dir DIR --output_dir OUT [RegisterConfig and TrainingArguments flags]
    register-adapter distill --model M --train_dir DIR --output_dir OUT [PHRegConfig and TrainingArguments flags]
    register-adapter diagnose --model M [--adapter A] IMAGE_OR_DIR... --out DIR
    register-adapter find-neurons --model M IMAGE_OR_DIR... --out DIR [--push_to_hub ID] [search settings]

Each subcommand lives in its own module; this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one line of help). Modules are imported only when their command runs: `register-adapter --help`
# loads no model code.
COMMANDS = {
    "demo": ("register_adapter.cli.demo", "add registers to a model, train them a few steps, save and reload"),
    "train": ("register_adapter.cli.train", "train registers (and a head, optionally LoRA) with the HF Trainer"),
    "distill": (
        "register_adapter.cli.distill",
        "distill registers into a frozen model from unlabelled images (PH-Reg)",
    ),
    "diagnose": ("register_adapter.cli.diagnose", "find artifact tokens and draw them"),
    "find-neurons": (
        "register_adapter.cli.find_neurons",
        "find register neurons on images and save the training-free test-time register adapter",
    ),
}


def _usage() -> str:
    lines = ["usage: register-adapter {" + ",".join(COMMANDS) + "} ...", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"register-adapter: unknown command {command!r}\n\n{_usage()}\n")
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)
