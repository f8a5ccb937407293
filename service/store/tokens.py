"""API tokens: creation, listing, revocation and verification.

:class:`TokensMixin` owns the ``api_tokens`` table. Only a token's SHA-256 is stored
(:func:`hash_token`; a secret carries 256 random bits and starts with :data:`TOKEN_PREFIX`), so a
secret is shown once, when it is created. A revoked token never verifies again.
:class:`Principal` is who a verified token speaks for; :class:`TokenInfo` what may be shown of a
token.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy import select, update

from bitscout.errors import InvalidRequest, NotFound
from service.models import TokenRow, utcnow
from service.store._base import StoreBase

TOKEN_PREFIX = "bst_"


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: the token's id, its user name (jobs' ``owner``) and whether it is an admin."""

    token_id: str
    name: str
    admin: bool


@dataclass(frozen=True)
class TokenInfo:
    """A stored API token (never the secret itself)."""

    id: str
    name: str
    prefix: str
    admin: bool
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def hash_token(secret: str) -> str:
    """How tokens are stored: SHA-256 of the secret (tokens carry 256 random bits)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


class TokensMixin(StoreBase):
    """API tokens (see the module docstring)."""

    def create_token(self, *, name: str, admin: bool = False) -> tuple[TokenInfo, str]:
        """Create an API token for user ``name``; returns ``(info, secret)``. Only the hash is stored:
        the secret cannot be shown again."""
        name = name.strip()
        if not name or len(name) > 128:
            raise InvalidRequest("a token needs a name of 1 to 128 characters", field="name")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = TokenRow(
            id=uuid.uuid4().hex,
            name=name,
            token_hash=hash_token(secret),
            prefix=secret[:10],
            admin=bool(admin),
            created_at=utcnow(),
        )
        with self._write() as s:
            s.add(row)
        return self._token_info(row), secret

    @staticmethod
    def _token_info(row: TokenRow) -> TokenInfo:
        return TokenInfo(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            admin=row.admin,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )

    def list_tokens(self, *, include_revoked: bool = False) -> list[TokenInfo]:
        """Every token (not the secrets), oldest first."""
        with self._read() as s:
            stmt = select(TokenRow).order_by(TokenRow.created_at, TokenRow.id)
            if not include_revoked:
                stmt = stmt.where(TokenRow.revoked_at.is_(None))
            return [self._token_info(r) for r in s.execute(stmt).scalars().all()]

    def revoke_token(self, *, token_id: str | None = None, name: str | None = None) -> list[str]:
        """Revoke the token ``token_id`` (or every token of user ``name``); returns the ids revoked.
        Raises ``NotFound`` when nothing matches."""
        if (token_id is None) == (name is None):
            raise InvalidRequest("give a token id or a name", field="token_id")
        with self._write() as s:
            stmt = select(TokenRow).where(TokenRow.revoked_at.is_(None))
            if token_id is not None:
                stmt = stmt.where(sa.or_(TokenRow.id == token_id, TokenRow.prefix == token_id))
            else:
                stmt = stmt.where(TokenRow.name == name)
            rows = s.execute(stmt).scalars().all()
            if not rows:
                raise NotFound(f"no active token {token_id or name!r}", field="token_id")
            now = utcnow()
            for r in rows:
                r.revoked_at = now
            return [r.id for r in rows]

    def verify_token(self, *, secret: str, touch: bool = False) -> Principal | None:
        """The principal of an active token, or None. With ``touch``, records ``last_used_at``."""
        if not secret or len(secret) > 256:
            return None
        digest = hash_token(secret)
        with self._read() as s:
            row = s.execute(
                select(TokenRow).where(TokenRow.token_hash == digest, TokenRow.revoked_at.is_(None))
            ).scalar_one_or_none()
            if row is None:
                return None
            principal = Principal(token_id=row.id, name=row.name, admin=row.admin)
        if touch:
            with self._write() as s:
                s.execute(
                    update(TokenRow).where(TokenRow.id == principal.token_id).values(last_used_at=utcnow())
                )
        return principal
