"""The database layer: typed models, engine/session factories, migrations. FastAPI-free."""

from .models import ApiKey, Base, Experiment, Point, Run, Study, StudyMember, Tenant, Worker
from .session import make_engine, make_session_factory, utcnow

__all__ = [
    "ApiKey",
    "Base",
    "Experiment",
    "Point",
    "Run",
    "Study",
    "StudyMember",
    "Tenant",
    "Worker",
    "make_engine",
    "make_session_factory",
    "utcnow",
]
