"""Tenants and API keys. A key is 256 random bits, shown once; only its SHA-256 is stored
(a fast hash is enough for a random key: there is nothing to brute-force)."""

from __future__ import annotations

import hashlib
import re
import secrets

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .models import ApiKey, Tenant
from .session import utcnow

KEY_PREFIX = "hsl_"
KEY_PATTERN = re.compile(r"^hsl_[A-Za-z0-9_-]{43}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LOCAL_TENANT = "local"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    if not TENANT_PATTERN.match(name):
        raise ValueError("tenant: 1-64 letters, digits, '_', '.', '-', starting alphanumeric")
    query = select(Tenant).where(Tenant.name == name)
    tenant = session.execute(query).scalar_one_or_none()
    if tenant is None:
        # two processes may create the same new tenant at once (e.g. two `hsl keys create`):
        # the loser's insert fails on the unique name and it reads the winner's row
        try:
            with session.begin_nested():
                tenant = Tenant(name=name, created_at=utcnow())
                session.add(tenant)
        except IntegrityError:
            tenant = session.execute(query).scalar_one()
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    """A new key for the tenant (created if needed). The caller commits and shows it once."""
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(tenant_id=tenant.id, prefix=key[:12], key_hash=hash_key(key), created_at=utcnow())
    )
    session.flush()
    return key


def revoke_key(session: Session, prefix: str) -> int:
    """Revoke every live key starting with ``prefix`` (at least 8 characters)."""
    if len(prefix) < 8:
        raise ValueError("give at least the first 8 characters of the key")
    result = session.execute(
        update(ApiKey)
        .where(ApiKey.prefix == prefix[:12], ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return result.rowcount


def tenant_for_key(session: Session, key: str) -> int | None:
    """The tenant id of a live key; None for an unknown, malformed or revoked key."""
    if not KEY_PATTERN.match(key):
        return None
    return session.execute(
        select(ApiKey.tenant_id).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    ).scalar_one_or_none()


def usable_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header when it is well formed, else None
    (the caller then goes through the full check, which says what is wrong)."""
    if authorization is None:
        return None
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not KEY_PATTERN.match(key):
        return None
    return key
