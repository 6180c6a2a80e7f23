"""Request dependencies as ``Annotated`` aliases: settings, session, tenant, publisher."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Protocol

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from .config import Settings
from .db import keys
from .errors import Unauthorized


class Publisher(Protocol):
    """Hands run ids to workers after the commit; returns the ids it published."""

    def publish(self, runs: list[tuple[int, str]]) -> list[int]: ...

    def wake(self) -> None: ...

    def ping(self) -> bool: ...


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request. Handlers that write commit once, then publish: publishing
    must follow the commit, so the commit cannot wait for the dependency's exit."""
    with request.app.state.sessions() as session:
        try:
            yield session
        except Exception:
            session.rollback()
            raise


def get_publisher(request: Request) -> Publisher:
    return request.app.state.publisher


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]


def resolve_tenant(
    session: Session, settings: Settings, authorization: str | None, local_tenant_id: int | None
) -> int:
    """The caller's tenant id, from ``Authorization: Bearer <key>``.

    Without a header, the embedded service on loopback serves its single local user.
    """
    if authorization is None:
        if settings.keys_required:
            raise Unauthorized("this route needs 'Authorization: Bearer <key>'")
        return local_tenant_id  # type: ignore[return-value]
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    tenant_id = keys.tenant_for_key(session, key.strip())
    if tenant_id is None:
        raise Unauthorized("unknown or revoked API key")
    return tenant_id


def get_tenant(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> int:
    return resolve_tenant(session, settings, authorization, request.app.state.local_tenant_id)


TenantDep = Annotated[int, Depends(get_tenant)]
