"""A test identity provider: signing keys of its own, their JWKS, and the JWTs it signs.

The tests of :mod:`shipyard_common.oidc` (here and in tests/shipyard_common) sign their tokens with
it; it uses ``cryptography`` directly, as the platform does, so no JOSE library is needed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://idp.example.test/realms/ml"
AUDIENCE = "shipyard"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(value: int) -> str:
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def new_key(alg: str = "RS256", *, rsa_bits: int = 2048) -> PrivateKey:
    if alg.startswith("ES"):
        curve = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}[alg]()
        return ec.generate_private_key(curve)
    return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)


def jwk(kid: str, key: PrivateKey, alg: str | None = None) -> dict[str, Any]:
    """The public JWK of ``key``."""
    entry: dict[str, Any] = {"kid": kid, "use": "sig"}
    if alg:
        entry["alg"] = alg
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {**entry, "kty": "RSA", "n": _int(numbers.n), "e": _int(numbers.e)}
    point = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}[key.curve.name]
    return {**entry, "kty": "EC", "crv": crv, "x": b64(point.x.to_bytes(size, "big")),
            "y": b64(point.y.to_bytes(size, "big"))}


def sign(signed: bytes, alg: str, key: PrivateKey | bytes) -> bytes:
    """A JWS signature of ``signed``: RSA PKCS#1 v1.5 or PSS, ECDSA as r‖s, HMAC, or none."""
    if alg == "none":
        return b""
    digest = _HASHES[alg[2:]]()
    if isinstance(key, bytes):  # HS*: the "secret" an attacker picks (a public key, say)
        return hmac.new(key, signed, getattr(hashlib, f"sha{alg[2:]}")).digest()
    if isinstance(key, rsa.RSAPrivateKey):
        pad: padding.AsymmetricPadding = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(
            mgf=padding.MGF1(_HASHES[alg[2:]]()), salt_length=digest.digest_size)
        return key.sign(signed, pad, digest)
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(digest)))
    size = (key.curve.key_size + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


class IdentityProvider:
    """Keys by id (the first is ``k1``, RS256), the JWKS that publishes them, and tokens signed by
    any of them with the claims a test wants."""

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer, self.audience = issuer, audience
        self.keys: dict[str, tuple[PrivateKey, str]] = {}
        self.add_key("k1", "RS256")

    def add_key(self, kid: str, alg: str = "RS256") -> PrivateKey:
        key = new_key(alg)
        self.keys[kid] = (key, alg)
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [jwk(kid, key, alg) for kid, (key, alg) in self.keys.items()]}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Claims that pass: this issuer and audience, issued now, good for five minutes."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": "alice@example.test",
                                  "iat": now, "exp": now + 300, "groups": ["ml-trainers"]}
        claims.update(overrides)
        return {key: value for key, value in claims.items() if value is not None}

    def token(
        self, *, kid: str | None = "k1", alg: str | None = None, key: PrivateKey | bytes | None = None,
        header: dict[str, Any] | None = None, **claims: Any,
    ) -> str:
        """A JWT signed with key ``kid`` (or ``key``, ``alg``); ``claims`` override :meth:`claims`
        (None drops one)."""
        own_key, own_alg = self.keys.get(kid or "", (None, "RS256"))
        alg = alg or own_alg
        head: dict[str, Any] = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {}), **(header or {})}
        signed = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(self.claims(**claims)).encode())}"
        signer = key if key is not None else own_key
        signature = sign(signed.encode(), alg, signer) if signer is not None or alg == "none" else b"x" * 256
        return f"{signed}.{b64(signature)}"
