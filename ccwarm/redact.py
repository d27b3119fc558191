"""Secrets out of reports: headers whose name says they carry a credential, any value seen in one,
and API-key/bearer patterns, wherever they appear."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_HEADERS = frozenset(
    {"x-api-key", "authorization", "proxy-authorization", "cookie", "set-cookie", "anthropic-api-key"}
)
# Any other header whose name says it carries a credential (x-goog-api-key, api-key, x-auth-token...).
_SECRET_HEADER_NAME = re.compile(r"key|token|secret|auth|cookie|passw(or)?d|credential", re.IGNORECASE)
REDACTED = "[REDACTED]"


def is_secret_header(name: str) -> bool:
    return name.lower() in SECRET_HEADERS or bool(_SECRET_HEADER_NAME.search(name))


_SECRET_PATTERNS = re.compile(r"sk-ant-[A-Za-z0-9_\-]{4,}|(?i:bearer)\s+[A-Za-z0-9._~+/=\-]{8,}")


class Redactor:
    """Redacts secret headers, and any value seen in one, wherever it appears in output."""

    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> dict[str, str]:
        items = headers.items() if isinstance(headers, Mapping) else (headers or [])
        out: dict[str, str] = {}
        for k, v in items:
            name = k.lower()
            if is_secret_header(name):
                pieces = [v.strip()]
                if name.endswith("authorization"):
                    pieces.append(v.strip().split(None, 1)[-1])  # the credential without its scheme
                elif "cookie" in name:
                    pieces += [p.split("=", 1)[-1].strip() for p in v.split(";")]
                self.secrets.update(p for p in pieces if len(p) >= 6)
                out[k] = REDACTED
            else:
                out[k] = v
        return out

    def text(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _SECRET_PATTERNS.sub(REDACTED, text)

    def data(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.data(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.data(v) for v in value]
        return value
