"""The plugin system: the pluggy manager and the registry it fills (``manager``), the typed hook specifications
grouped by phase (``hookspecs``) and mtkit's own registrations (``builtin``).

The face imports nothing: ``import mtkit`` needs the hook marker alone; import ``mtkit.plugins.manager``.
"""
