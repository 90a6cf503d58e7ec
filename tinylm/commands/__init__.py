"""The built-in CLI subcommands that are more than a few lines, one module each;
``tinylm/cli.py`` attaches them to the ``tinylm`` group."""
