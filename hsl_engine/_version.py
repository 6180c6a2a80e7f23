"""The engine version: part of every point's provenance and of the service's dedupe key.

Bump it whenever the numbers a spec produces change (sample streams, solvers, defaults).
"""

ENGINE_VERSION = "0.11.0"
