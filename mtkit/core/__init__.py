"""The core every other package stands on: the recipe schema (``schema``), the registry (``registry``), typed
results (``results``), the runtime (devices, processes: ``runtime``), precision and the CUDA math policy
(``precision``), the one atomic write (``io``),
checkpoints (``checkpoint``), progress bars (``progress``) and the errors (``errors``).

The face imports nothing, so that ``import mtkit`` (which needs the registry) stays light; import the modules.
"""
