"""`optimum-cli treeffn ...`: the treeffn CLI as an optimum-cli plugin.

optimum-cli imports every module in the `optimum.commands.register` namespace (PEP 420: this
folder has no __init__.py) and registers its REGISTER_COMMANDS. The subcommands and their
implementation are treeffn_hf's own, so both entry points behave identically.
"""

import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class TreeFFNCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="treeffn", help="treeffn_hf: convert dense LLMs to sparse tree-FFN / micro-gated models")

    @staticmethod
    def parse_args(parser):
        from treeffn_hf.cli.main import add_subcommands

        add_subcommands(parser)

    def run(self):
        from treeffn_hf.cli.main import dispatch

        code = dispatch(self.parser, self.args)
        if code:
            sys.exit(code)


REGISTER_COMMANDS = [TreeFFNCommand]
