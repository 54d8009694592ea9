"""``python -m tandem.cli``: the command line of :mod:`tandem.cli.commands`."""

from tandem.cli.commands import main

main()
