"""Bearer JWTs from an identity provider (OIDC): optional, for teams that sign people in elsewhere.

With ``SHIPYARD_OIDC_ISSUER`` set, a bearer token that is no configured token and has a JWT's shape
is verified here: its signature (RS256/384/512, PS256/384/512, ES256/384/512, with the provider's
public keys from a JWKS file or URL), its issuer, audience, expiry and not-before (with a leeway).
Its holder's name is a claim (``sub`` unless set) and its role comes from a role claim, from groups
mapped to roles, or from a default; the audit then records that name like a configured token's.

The signature is checked with ``cryptography`` (no JOSE library in the lock): the few lines that
parse a JWS compact token and a JWK are here, and refuse what they do not know (``alg: none``,
``crit`` headers, keys of another type or curve, RSA keys under 2048 bits).

The JWKS is read once, then again when a token names a key id it lacks (a rotation) at most once per
``jwks_refresh_min_s``, and when it is older than ``jwks_cache_s``. A token that verified is
remembered (by its SHA-256) until it expires, so serving pays the signature check once per token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shipyard_common.auth import Principal, Role
from shipyard_common.errors import Unauthorized, Unavailable

log = logging.getLogger("shipyard.oidc")

Algorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512,
}
_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1,
}
_CURVE_OF = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
# When a token carries several roles (a list, or several mapped groups), the first of these it has.
ROLE_PRECEDENCE = (Role.ADMIN, Role.APPROVER, Role.TRAINER, Role.VIEWER)
MAX_JWT_CHARS = 16 * 1024
MAX_JWKS_BYTES = 1024 * 1024
MIN_RSA_BITS = 2048
MAX_NAME_CHARS = 128  # the audit's actor column
VERIFIED_CACHE = 4096
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class OidcSettings(BaseSettings):
    """``SHIPYARD_OIDC_*``: accept an identity provider's JWTs as bearer tokens (off while ``issuer``
    is unset). Configured tokens keep working beside them."""

    model_config = SettingsConfigDict(env_prefix="SHIPYARD_OIDC_", extra="ignore")

    issuer: str | None = Field(default=None, description="The tokens' 'iss', exactly; unset: OIDC off.")
    audience: str | None = Field(default=None, description="What the tokens' 'aud' must hold.")
    jwks_url: str | None = Field(default=None, description="The provider's JWKS (its jwks_uri).")
    jwks_file: Path | None = Field(default=None, description="Or a JWKS file, read the same way.")
    algorithms: list[Algorithm] = Field(
        default_factory=lambda: list[Algorithm](["RS256", "ES256"]),
        description="The signature algorithms taken (never 'none').",
    )
    name_claim: str = Field(default="sub", description="The claim that names the holder (audit rows).")
    role_claim: str | None = Field(
        default=None, description="A claim holding a role or a list of them (dotted: realm_access.roles).",
    )
    groups_claim: str = Field(default="groups", description="The claim holding the holder's groups.")
    group_roles: dict[str, Role] = Field(default_factory=dict, description='{"ml-admins": "admin", …}')
    default_role: Role | None = Field(default=None, description="The role of a token that names none.")
    leeway_s: int = Field(default=30, ge=0, le=600, description="Clock skew allowed on exp, nbf, iat.")
    jwks_cache_s: float = Field(default=3600, ge=1, description="Read the JWKS again after this long.")
    jwks_refresh_min_s: float = Field(
        default=60, ge=0, description="At most one read per this many seconds for an unknown key id.",
    )
    jwks_timeout_s: float = Field(default=5, gt=0, le=60, description="Seconds to fetch the JWKS URL.")

    @property
    def enabled(self) -> bool:
        """Whether JWTs are taken: an issuer is set."""
        return self.issuer is not None

    @model_validator(mode="after")
    def _complete_when_on(self) -> OidcSettings:
        """With an issuer, the rest must say how to verify a token and what role it gives."""
        if not self.enabled:
            return self
        if not self.audience:
            raise ValueError("SHIPYARD_OIDC_AUDIENCE is needed with SHIPYARD_OIDC_ISSUER")
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("set one of SHIPYARD_OIDC_JWKS_URL or SHIPYARD_OIDC_JWKS_FILE")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("SHIPYARD_OIDC_JWKS_URL must be an http(s) URL")
        if not (self.role_claim or self.group_roles or self.default_role):
            raise ValueError("say where a token's role comes from: SHIPYARD_OIDC_ROLE_CLAIM, "
                             "SHIPYARD_OIDC_GROUP_ROLES or SHIPYARD_OIDC_DEFAULT_ROLE")
        return self

    def as_env(self) -> dict[str, str]:
        """The ``SHIPYARD_OIDC_*`` variables that give a child process these settings."""
        if not self.enabled:
            return {}
        values = self.model_dump(mode="json", exclude_none=True)
        return {f"SHIPYARD_OIDC_{key.upper()}": value if isinstance(value, str) else json.dumps(value)
                for key, value in values.items()}


def validator(settings: OidcSettings) -> JwtValidator | None:
    """The JWT validator these settings ask for, or None while OIDC is off."""
    return JwtValidator(settings) if settings.enabled else None


def _refused(why: str) -> Unauthorized:
    """A 401 for a JWT, saying why: the caller can tell a clock problem from a wrong audience."""
    return Unauthorized(f"JWT refused: {why}")


def _b64(part: str, what: str) -> bytes:
    """One base64url part of a JWT, decoded; Unauthorized naming ``what`` when it is not one."""
    # Strictly the base64url alphabet: the decoder would otherwise skip what it does not know.
    if _BASE64URL.fullmatch(part) is None:
        raise _refused(f"malformed: its {what} is not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise _refused(f"malformed: its {what} is not base64url") from None


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    """A JWT's header or payload as a JSON object; Unauthorized otherwise."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise _refused(f"malformed: its {what} is not a JSON object")
    return value


@dataclass(frozen=True)
class Jws:
    """A compact JWS split: header and claims decoded, what was signed, and the signature."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signed: bytes
    signature: bytes


def parse_jws(token: str) -> Jws:
    """Split and decode a compact JWS (``header.claims.signature``); Unauthorized if malformed."""
    if len(token) > MAX_JWT_CHARS:
        raise _refused(f"malformed: longer than {MAX_JWT_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise _refused("malformed: a JWT is three base64url parts separated by dots")
    header = _json_object(_b64(parts[0], "header"), "header")
    claims = _json_object(_b64(parts[1], "payload"), "payload")
    return Jws(header, claims, f"{parts[0]}.{parts[1]}".encode(), _b64(parts[2], "signature"))


def _b64_int(value: Any) -> int:
    """A JWK's big-endian base64url integer (an RSA modulus, an EC coordinate)."""
    if not isinstance(value, str):
        raise ValueError("not a base64url string")
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def public_key(jwk: Mapping[str, Any]) -> PublicKey | None:
    """The public key of a JWK (RSA, or EC on P-256/384/521), None for one Shipyard does not use
    (another type, ``use`` other than ``sig``). Raises ValueError for a malformed or weak key."""
    if jwk.get("use", "sig") != "sig":
        return None
    if jwk.get("kty") == "RSA":
        key = rsa.RSAPublicNumbers(_b64_int(jwk.get("e")), _b64_int(jwk.get("n"))).public_key()
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits (at least {MIN_RSA_BITS})")
        return key
    curve = _CURVES.get(str(jwk.get("crv"))) if jwk.get("kty") == "EC" else None
    if curve is None:
        return None
    return ec.EllipticCurvePublicNumbers(_b64_int(jwk.get("x")), _b64_int(jwk.get("y")), curve()).public_key()


def fits(key: PublicKey, jwk_alg: Any, alg: str) -> bool:
    """Whether ``key`` (whose JWK names ``jwk_alg``, or none) may verify a token signed with ``alg``."""
    if jwk_alg is not None and jwk_alg != alg:
        return False
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES[_CURVE_OF[alg]])


def verify_signature(key: PublicKey, alg: str, signed: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``signed`` verifies with ``key`` under ``alg`` (JWS rules: ECDSA
    signatures are r‖s of the curve's size, not DER)."""
    digest = _HASHES[alg[2:]]()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(
                mgf=padding.MGF1(_HASHES[alg[2:]]()), salt_length=digest.digest_size)
            key.verify(signature, signed, pad, digest)
            return True
        size = math.ceil(key.curve.key_size / 8)
        if len(signature) != 2 * size:
            return False
        r, s = int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
        key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(digest))
        return True
    except InvalidSignature:
        return False


@dataclass(frozen=True)
class SigningKey:
    kid: str | None
    alg: Any  # the JWK's "alg", if it names one
    key: PublicKey


class JwksCache:
    """The identity provider's signing keys: read at the first token, again when one names a key id
    it lacks (at most once per ``refresh_min_s``) or when they are ``max_age_s`` old. A failed read
    keeps the keys it had; with none, tokens are answered 503 until a read succeeds."""

    def __init__(
        self, *, url: str | None = None, file: Path | None = None, timeout_s: float = 5,
        max_age_s: float = 3600, refresh_min_s: float = 60, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = url or str(file)
        self._url, self._file, self._timeout_s = url, file, timeout_s
        self._max_age_s, self._refresh_min_s, self._clock = max_age_s, refresh_min_s, clock
        self._keys: list[SigningKey] | None = None
        self._loaded_at = self._tried_at = -math.inf
        self._error = ""
        self._lock = threading.Lock()
        self.reads = 0  # how many times the JWKS was read (or tried)

    def find(self, kid: str | None, alg: str) -> PublicKey | None:
        """The key ``kid`` names for ``alg`` (without a kid: the one key for ``alg``), or None."""
        with self._lock:
            now = self._clock()
            if (self._keys is None or now - self._loaded_at >= self._max_age_s) and self._due(now):
                self._reload(now)
            if self._keys is None:
                raise Unavailable(
                    f"the identity provider's keys ({self.source}) cannot be read: {self._error}"
                )
            found = self._pick(kid, alg)
            if found is None and self._due(now):
                self._reload(now)  # a key id never seen: the provider may have rotated its keys
                found = self._pick(kid, alg)
            return found

    def prefetch(self) -> None:
        """Read the keys now (a failure is logged and retried at the first token, as ever)."""
        with self._lock:
            if self._keys is None:
                self._reload(self._clock())
                self._tried_at = -math.inf  # the first token may still try again at once

    def _due(self, now: float) -> bool:
        """Whether a read may happen now: the last one (or its failure) is ``refresh_min_s`` old."""
        return now - self._tried_at >= self._refresh_min_s

    def _pick(self, kid: str | None, alg: str) -> PublicKey | None:
        """The key for ``kid`` and ``alg`` among those read; without a kid, only an unambiguous one."""
        fitting = [key for key in self._keys or () if fits(key.key, key.alg, alg)]
        if kid is not None:
            return next((key.key for key in fitting if key.kid == kid), None)
        return fitting[0].key if len(fitting) == 1 else None

    def _reload(self, now: float) -> None:
        """Read the JWKS again; a failure is logged and keeps the keys already held."""
        self._tried_at = now
        self.reads += 1
        try:
            keys = self._read()
        except (OSError, httpx.HTTPError, ValueError) as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot read the identity provider's keys",
                        extra={"jwks": self.source, "error": self._error})
            return
        self._keys, self._loaded_at = keys, now

    def _read(self) -> list[SigningKey]:
        """The JWKS's usable signing keys, from the URL or the file; a key that cannot be used is
        skipped with a warning, a document that is no JWKS raises ValueError."""
        if self._url is not None:
            response = httpx.get(self._url, timeout=self._timeout_s, headers={"Accept": "application/json"})
            response.raise_for_status()
            raw = response.content
        else:
            assert self._file is not None
            raw = self._file.read_bytes()
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        document = json.loads(raw)
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError('a JWKS is a JSON object with a "keys" list')
        keys = []
        for jwk in document["keys"]:
            kid = jwk.get("kid") if isinstance(jwk, dict) and isinstance(jwk.get("kid"), str) else None
            try:
                key = public_key(jwk) if isinstance(jwk, dict) else None
            except (ValueError, TypeError) as exc:
                log.warning("a key of the JWKS is skipped",
                            extra={"jwks": self.source, "kid": kid, "error": str(exc)})
                continue
            if key is not None:
                keys.append(SigningKey(kid=kid, alg=jwk.get("alg"), key=key))
        return keys


def _shown(value: Any) -> str:
    """A value from a token, for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _when(seconds: float) -> str:
    """A token's time (seconds since the epoch) as ISO 8601 UTC, for messages."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def claim(claims: Mapping[str, Any], path: str) -> Any:
    """The claim ``path`` names: a top-level claim by that whole name (``https://example.com/roles``),
    else one nested by dots (``realm_access.roles``); None if absent."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any) -> list[str]:
    """A claim as a list of strings: one string, or the strings of a list (roles, groups)."""
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    """A time claim (``exp``, ``nbf``, ``iat``) in seconds, None if absent; Unauthorized if not a number."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _refused(f"its '{name}' is not a number of seconds")
    return float(value)


class JwtValidator:
    """Verifies an identity provider's JWT and says who holds it (see the module docstring); a
    :class:`~shipyard_common.auth.BearerValidator` for the token authenticator."""

    def __init__(
        self, settings: OidcSettings, *, keys: JwksCache | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.keys = keys or JwksCache(
            url=settings.jwks_url, file=settings.jwks_file, timeout_s=settings.jwks_timeout_s,
            max_age_s=settings.jwks_cache_s, refresh_min_s=settings.jwks_refresh_min_s,
        )
        self._clock = clock
        # SHA-256 of a token that verified -> (until when it is good, its principal).
        self._verified: dict[bytes, tuple[float, Principal]] = {}
        self._lock = threading.Lock()

    def prefetch(self) -> None:
        """Read the provider's keys before the first token needs them (:meth:`JwksCache.prefetch`)."""
        self.keys.prefetch()

    def accepts(self, token: str) -> bool:
        """Whether ``token`` has a JWT's shape (three parts), so that its refusal says why."""
        return token.count(".") == 2

    def principal(self, token: str) -> Principal:
        """The holder of ``token``, or Unauthorized saying what is wrong with it."""
        digest = hashlib.sha256(token.encode()).digest()
        now = self._clock()
        known = self._verified.get(digest)
        if known is not None and now <= known[0]:
            return known[1]
        jws = parse_jws(token)
        self._check_signature(jws)
        expires = self._check_times(jws.claims, now)
        principal = Principal(name=self._name(jws.claims), role=self._role(jws.claims))
        self._remember(digest, expires + self.settings.leeway_s, now, principal)
        return principal

    def _check_signature(self, jws: Jws) -> None:
        """Refuse an unsigned or wrongly signed token, naming the algorithm, key id or signature at fault."""
        taken = ", ".join(self.settings.algorithms)
        alg = jws.header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise _refused(f"it is not signed (alg {_shown(alg)}); this platform takes {taken}")
        if alg not in self.settings.algorithms:
            raise _refused(f"its algorithm {_shown(alg)} is not one this platform takes ({taken})")
        if "crit" in jws.header:
            raise _refused("it has critical header extensions ('crit') this platform does not know")
        kid = jws.header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _refused("malformed: its key id ('kid') is not a string")
        key = self.keys.find(kid, alg)
        if key is None and kid is None:
            raise _refused(f"it names no key id ('kid') and the identity provider's keys "
                           f"({self.keys.source}) hold no single {alg} key")
        if key is None:
            raise _refused(f"its key id {_shown(kid)} is unknown: the identity provider's keys "
                           f"({self.keys.source}) have no {alg} key by that id")
        if not verify_signature(key, alg, jws.signed, jws.signature):
            which = f"key {_shown(kid)}" if kid is not None else f"{alg} key"
            raise _refused(f"its signature does not verify with the identity provider's {which}")

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float:
        """Issuer, audience, expiry, not-before and issued-at; the expiry, when all hold."""
        settings, leeway = self.settings, self.settings.leeway_s
        if claims.get("iss") != settings.issuer:
            raise _refused(f"its issuer {_shown(claims.get('iss'))} is not {settings.issuer!r}")
        if settings.audience not in _strings(claims.get("aud")):
            raise _refused(f"its audience {_shown(claims.get('aud'))} does not include {settings.audience!r}")
        expires = _number(claims, "exp")
        if expires is None:
            raise _refused("it has no expiry ('exp')")
        if now > expires + leeway:
            raise _refused(f"it expired at {_when(expires)} ({now - expires:.0f} s ago; leeway {leeway} s)")
        not_before = _number(claims, "nbf")
        if not_before is not None and now < not_before - leeway:
            raise _refused(f"it is not valid before {_when(not_before)}")
        issued = _number(claims, "iat")
        if issued is not None and issued > now + leeway:
            raise _refused(f"it was issued in the future ({_when(issued)}): check the clocks")
        return expires

    def _name(self, claims: Mapping[str, Any]) -> str:
        """The holder's name from the name claim: what the audit and self-approval checks record."""
        name = claim(claims, self.settings.name_claim)
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS \
                or not name.isprintable():
            raise _refused(f"its '{self.settings.name_claim}' claim, which names its holder, is missing or "
                           f"not a name (printable text, at most {MAX_NAME_CHARS} characters)")
        return name

    def _role(self, claims: Mapping[str, Any]) -> Role:
        """The first of admin, approver, trainer, viewer the token's role claim or mapped groups give,
        else the default role."""
        settings = self.settings
        found: set[str] = set()
        if settings.role_claim:
            found |= {value.lower() for value in _strings(claim(claims, settings.role_claim))}
        groups = _strings(claim(claims, settings.groups_claim))
        found |= {settings.group_roles[group].value for group in groups if group in settings.group_roles}
        role = next((role for role in ROLE_PRECEDENCE if role.value in found), settings.default_role)
        if role is None:
            where = [f"no role in its '{settings.role_claim}' claim"] if settings.role_claim else []
            if settings.group_roles:
                where.append(f"none of its '{settings.groups_claim}' is mapped to a role")
            raise _refused(f"it grants no Shipyard role ({' and '.join(where)})")
        return role

    def _remember(self, digest: bytes, until: float, now: float, principal: Principal) -> None:
        """Keep a verified token's principal until it expires; bounded, expired entries dropped first."""
        with self._lock:
            if len(self._verified) >= VERIFIED_CACHE:
                self._verified = {key: seen for key, seen in self._verified.items() if seen[0] >= now}
                if len(self._verified) >= VERIFIED_CACHE:
                    self._verified.clear()
            self._verified[digest] = (until, principal)
