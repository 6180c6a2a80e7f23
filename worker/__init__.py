"""hsl workers: the one function that executes a run, its Celery adapter, the embedded
in-process worker, and the reaper. Imports the engine and ``service.db``/``service.config``,
never the web layer."""
