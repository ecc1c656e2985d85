"""``python -m tinydeploy``: the same CLI as the ``tinydeploy`` command."""

from cli.main import main

main()
