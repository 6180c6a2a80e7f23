"""The hsl HTTP service: FastAPI routes over the database (see docs/reference.md).

``service.app.create_app`` builds the application; ``service.db`` and ``service.config``
import no FastAPI, so the worker and the command line use them without the web stack.
"""
