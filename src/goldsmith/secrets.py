"""Secrets for customizers, and what keeps them (and credentials in URIs) out of everything Goldsmith shows.

A template names secrets; it never holds them. The `goldsmith.secrets` block maps an environment variable to an
Airflow connection field or variable, so any Airflow secrets backend (Azure Key Vault included) serves them:

    "goldsmith": {"secrets": {
        "DB_PASSWORD": {"connection": "app_db", "field": "password"},
        "API_TOKEN": {"variable": "api_token"}}}

At each customize and validate step the worker reads them (`resolve`), registers every value with Airflow's
secrets masker (`mask_secret`: task logs show `***`), and hands them to the build VM's Shell scripts as
environment variables through a 0600 file it uploads, sources and deletes: never on a command line, never in
XCom, the plan, a run output or a DAG.

`strip_secrets` is for what Goldsmith itself writes (DAG docs, asset URIs, run outputs, OpenLineage events,
errors): URIs lose their query string (Azure SAS tokens live there) and their `user:password@`.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

# scheme://[userinfo@]rest[?query][#fragment], as it appears inside any text
_URI = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#'\"`<>]*@)?(?P<rest>[^\s?#'\"`<>]*)"
                  r"(?P<query>\?[^\s#'\"`<>]*)?")


def strip_uri(uri: str) -> str:
    """A URI as it may be shown or recorded: without its query string and `user:password@`."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.query and "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl()


def strip_secrets(text: str) -> str:
    """Every URI inside `text` stripped as `strip_uri` does."""
    if "://" not in text:
        return text
    return _URI.sub(lambda m: m.group("head") + m.group("rest"), text)


def strip_secrets_json(value: Any) -> Any:
    """`strip_secrets` on every string (keys included) of a JSON value."""
    if isinstance(value, str):
        return strip_secrets(value)
    if isinstance(value, dict):
        return {strip_secrets(k): strip_secrets_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_secrets_json(v) for v in value]
    return value


class SecretError(Exception):
    """A referenced connection or variable is missing: the message names it, never a value."""


def resolve(refs: Mapping[str, Any]) -> dict[str, str]:
    """The values of a template's `goldsmith.secrets` (name -> SecretRef), each registered with the masker.

    Runs only in a task (it reads Airflow connections and variables); an empty mapping costs nothing.
    """
    if not refs:
        return {}
    from airflow.sdk import Connection, Variable
    from airflow.sdk.log import mask_secret

    values: dict[str, str] = {}
    for name, ref in refs.items():
        try:
            if ref.variable is not None:
                value = Variable.get(ref.variable)
            else:
                conn = Connection.get(ref.connection)
                value = conn.get_uri() if ref.field == "uri" else getattr(conn, ref.field)
        except Exception as e:  # noqa: BLE001 — the SDK raises its own not-found types per version
            what = f"variable '{ref.variable}'" if ref.variable is not None else f"connection '{ref.connection}'"
            raise SecretError(f"goldsmith.secrets.{name}: Airflow {what} is not available "
                              f"({type(e).__name__}); create it, or fix the reference") from None
        value = "" if value is None else str(value)
        if value:
            mask_secret(value, name)
        values[name] = value
    return values
