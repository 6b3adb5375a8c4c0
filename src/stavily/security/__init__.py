"""Organizations, API tokens, roles and credential handling."""

from stavily.security.access import Principal, authenticate_token, bootstrap, create_api_token
from stavily.security.credentials import CredentialCache, digest, generate

__all__ = [
    "CredentialCache",
    "Principal",
    "authenticate_token",
    "bootstrap",
    "create_api_token",
    "digest",
    "generate",
]
