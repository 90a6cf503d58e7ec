"""tinylm's built-in plugins: ordinary plugin modules, registered by
``tinylm.plugins`` through the same hooks as third-party plugins (not through entry
points). Add a module here to make it a built-in."""

DEFAULT_PLUGINS = (
    "tinylm.default_plugins.positional",
    "tinylm.default_plugins.architectures",
    "tinylm.default_plugins.tokenizers",
    "tinylm.default_plugins.objectives",
    "tinylm.default_plugins.peft",
    "tinylm.default_plugins.rewards",
)
