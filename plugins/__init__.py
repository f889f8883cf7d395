"""The built-in plugins. Each subpackage is a plugin registered under the ``sluice.plugins`` entry-point group."""
