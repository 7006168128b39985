"""``python -m atlasd`` is the ``atlasd`` command."""

from atlasd.cli import main

main()
