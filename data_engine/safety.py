"""The quality step's safety filters: a blocklist of terms and PII (secrets, emails, IP
addresses, phone numbers), found, counted and redacted.

    verdict = blocklist_verdict(text, cfg)              # None, or ("blocklist", detail)
    redacted, counts, verdict = scrub_pii(text, cfg)    # redact, or reject ("drop" kinds)

``cfg`` is a data_engine.quality.QualityConfig; data_engine/quality.py runs these after its
heuristic rules, in that order, and names the reasons safety:blocklist and pii:<kind>.
"""
from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_engine.quality import QualityConfig, Verdict

PII_KINDS = ("secret", "email", "ip", "phone")  # also the order they are searched in
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "secret": "<SECRET>"}


# --- safety: blocklist ------------------------------------------------------------

def load_blocklist(path: str | Path | None) -> tuple[str, ...]:
    """Terms from a file, one per line; '#' starts a comment. Cached per (path, mtime, size),
    so a long-lived worker picks up an edited file."""
    if path is None:
        return _blocklist_terms(None, 0, 0)
    if not Path(path).is_file():
        raise ValueError(f"quality.blocklist_file: no such file {str(path)!r}")
    stat = Path(path).stat()
    return _blocklist_terms(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _blocklist_terms(path: str | None, _mtime_ns: int, _size: int) -> tuple[str, ...]:
    if path is None:
        raw = resources.files("data_engine").joinpath("resources/blocklist.txt").read_text("utf-8")
    else:
        raw = Path(path).read_text("utf-8")
    terms = (line.split("#", 1)[0].strip() for line in raw.splitlines())
    return tuple(t for t in terms if t)


@lru_cache(maxsize=8)
def _blocklist_regex(terms: tuple[str, ...]) -> re.Pattern | None:
    if not terms:
        return None
    # Longest first so a phrase wins over a word it contains.
    longest_first = sorted(set(terms), key=len, reverse=True)
    parts = [r"\s+".join(map(re.escape, t.split())) for t in longest_first]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


def blocklist_pattern(cfg: QualityConfig) -> re.Pattern | None:
    """The compiled blocklist (cached); quality_batch looks it up once per batch, not per row."""
    return _blocklist_regex(load_blocklist(cfg.blocklist_file) + tuple(cfg.blocklist_extra))


def blocklist_verdict(text: str, cfg: QualityConfig, regex: re.Pattern | None = None) -> Verdict:
    if cfg.blocklist_min_hits is None:
        return None
    regex = regex or blocklist_pattern(cfg)
    hits = regex.findall(text) if regex else []
    if len(hits) < cfg.blocklist_min_hits:
        return None
    terms = sorted({" ".join(h.lower().split()) for h in hits})
    return "blocklist", {"value": len(hits), "min": cfg.blocklist_min_hits, "terms": terms}


# --- PII ----------------------------------------------------------------------------

_SECRET_PATTERNS = [re.compile("|".join(f"(?:{p})" for p in (
    r"-----BEGIN [A-Z ]*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?-----END [A-Z ]*PRIVATE KEY"
    r"(?: BLOCK)?-----)?",
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",
    r"(?<![\w-])sk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{20,}",
    r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}",
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b|\bgithub_pat_[A-Za-z0-9_]{22,}",
    r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    r"\bAIza[0-9A-Za-z_-]{35}\b",
    r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
)))]
# Each pattern above contains one of these, case and all: a text with none is not scanned.
_SECRET_LITERALS = ("PRIVATE KEY", "AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA",
                    "sk-", "sk_", "rk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
                    "xox", "AIza", "eyJ")
_KEYWORD = (r"(?i:\b(?:password|passwd|pwd|secret|secret[_-]?key|api[_-]?key|"
            r"token|access[_-]?token|auth[_-]?token|private[_-]?key)\b)")
# Only the value is replaced: "password=<SECRET>" keeps the sentence readable.
_ASSIGNED_SECRETS = [
    re.compile(_KEYWORD + r"[\"']?\s*[:=]\s*([\"'])(?P<value>[^\"'\s]{4,})\1"),
    # Unquoted values must hold a letter and a digit and end at a delimiter,
    # so code such as password=None, password=getpass() or pwd=self.pwd is left alone.
    re.compile(_KEYWORD + r"\s*[:=]\s*(?P<value>(?=[^\s]*\d)(?=[^\s]*[A-Za-z])"
                          r"[A-Za-z0-9!@#$%^&*_+~-]{8,})(?=[\s,;)\"'\]}&]|$)"),
]
_HEX_SECRET = re.compile(r"(?<![0-9A-Za-z-])(?:[0-9a-f]{32,}|[0-9A-F]{32,})(?![\w-])")
_LOWER_RUN = re.compile(r"[a-z]{4,}")
_B64_SECRET = re.compile(r"(?<![\w+/=-])[A-Za-z0-9+/]{40,}={0,2}(?![\w+/=-])")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                   r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f:]*[0-9A-Fa-f]{3})[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4})"
                   r"{2,7}(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w.+/-])(?:(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[.-])[2-9]\d{2}[.-]\d{4}"
    r"|\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5})(?![\w/-]|\.\d)")


def _entropy(s: str) -> float:
    return -sum(c / len(s) * math.log2(c / len(s)) for c in Counter(s).values())


def _is_hex_secret(s: str) -> bool:
    return any(c.isdigit() for c in s) and any(c.isalpha() for c in s) and _entropy(s) > 3.0


def _is_b64_secret(s: str) -> bool:
    core = s.rstrip("=")
    mixed = all(any(map(test, core)) for test in (str.isdigit, str.isupper, str.islower))
    # Long identifiers and paths (CamelCaseNames42) are mostly lowercase runs;
    # random base64 rarely has 4 lowercase letters in a row.
    wordy = sum(map(len, _LOWER_RUN.findall(core))) / len(core) > 0.3
    return mixed and not wordy and _entropy(core) > 4.2


def _ip_ok(s: str, cfg: QualityConfig) -> bool:
    try:
        address = ipaddress.ip_address(s)
    except ValueError:
        return False
    local = (address.is_loopback or address.is_unspecified or address.is_link_local
             or address.is_multicast or address.is_reserved)
    return not (cfg.ip_skip_local and local)


def find_pii(text: str, kind: str, cfg: QualityConfig) -> list[tuple[int, int]]:
    """Spans (start, end) of ``kind`` in text; for assigned secrets only the value."""
    if kind == "secret":
        spans = [m.span() for p in _SECRET_PATTERNS for m in p.finditer(text)] \
            if any(lit in text for lit in _SECRET_LITERALS) else []
        spans += [m.span("value") for p in _ASSIGNED_SECRETS for m in p.finditer(text)]
        spans += [m.span() for m in _HEX_SECRET.finditer(text) if _is_hex_secret(m.group())]
        spans += [m.span() for m in _B64_SECRET.finditer(text) if _is_b64_secret(m.group())]
    elif kind == "email":
        spans = [m.span() for m in _EMAIL.finditer(text)] if "@" in text else []
    elif kind == "ip":
        spans = [m.span() for rx in (_IPV4, _IPV6) if rx is _IPV4 or ":" in text
                 for m in rx.finditer(text) if _ip_ok(m.group(), cfg)]
    else:
        # "+CC ..." numbers may be short (8 digits); bare ones need area code too.
        spans = [m.span() for m in _PHONE.finditer(text)
                 if (8 if m.group().startswith("+") else 10)
                 <= sum(c.isdigit() for c in m.group()) <= 15]
    return _merge(spans)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def redact(text: str, spans: list[tuple[int, int]], placeholder: str) -> str:
    """Replace sorted, disjoint spans with placeholder."""
    bounds = [0] + [i for span in spans for i in span] + [len(text)]
    pieces = [text[bounds[i]:bounds[i + 1]] for i in range(0, len(bounds), 2)]
    return placeholder.join(pieces)


def scrub_pii(text: str, cfg: QualityConfig) -> tuple[str, dict[str, int], Verdict]:
    """(redacted text, redactions per kind, drop verdict or None).

    Kinds are searched in PII_KINDS order on the text as redacted so far, so
    an address inside a secret is counted once, as the secret.
    """
    counts: dict[str, int] = {}
    for kind in (k for k in PII_KINDS if k in cfg.pii_kinds):
        spans = find_pii(text, kind, cfg)
        if not spans:
            continue
        if cfg.pii_action_by_kind.get(kind, cfg.pii_action) == "drop":
            return text, counts, (kind, {"value": len(spans), "action": "drop"})
        text = redact(text, spans, PLACEHOLDERS[kind])
        counts[kind] = len(spans)
    return text, counts, None


def redact_all_pii(text: str, cfg: QualityConfig) -> str:
    """Every kind in cfg.pii_kinds redacted, whatever its action: for rows going to rejected/."""
    for kind in (k for k in PII_KINDS if k in cfg.pii_kinds):
        spans = find_pii(text, kind, cfg)
        if spans:
            text = redact(text, spans, PLACEHOLDERS[kind])
    return text
