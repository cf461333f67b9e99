"""Subcommands of `testbed`. Each module exposes `register(subparsers)`, which adds its parser
and sets `func` (args -> exit status). cli.py only wires them together."""

COMMAND_MODULES = (
    "testbed.commands.lab",
    "testbed.commands.balance",
    "testbed.commands.calibrate",
    "testbed.commands.bench",
    "testbed.commands.manager",
    "testbed.commands.plot",
    "testbed.commands.report",
    "testbed.commands.run",
    "testbed.commands.sim",
)
