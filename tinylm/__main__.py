"""``python -m tinylm ...``: the ``tinylm`` command (e.g. under ``python -m cProfile``)."""

from tinylm.cli import main

main()
