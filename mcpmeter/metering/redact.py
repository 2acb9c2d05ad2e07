"""Secrets kept out of what is recorded: redacted tool arguments, scrubbed URIs and errors.

Arguments are never stored by default. With ``--record-args`` a copy is stored in which
values under keys that name a secret are replaced, and strings that look like credentials
(bearer tokens, API keys of common providers, JWTs, private keys, passwords in URLs) are
masked wherever they appear (:func:`redact`). The copy is cut at :data:`MAX_ARGS_BYTES`.

What every row records whatever the options, a ``resources/*`` URI (column ``tool``) and a
server's error text (``error_message``), and the same text in OpenTelemetry attributes, goes
through :func:`scrub_text`: the same string rules, so a password in a URL, a presigned URL's
signature or a token quoted in an error never reaches the store or a collector, while the
rest of the text stays readable, and groupable.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

MASK = "[REDACTED]"
MAX_ARGS_BYTES = 4096

#: A key names a secret when, lower-cased without separators, it ends with one of these
#: (``accessToken``, ``X-Api-Key``, ``db_password``) or is one of the short ones exactly.
_SECRET_SUFFIXES = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "privatekey",
    "accesskey",
    "secretkey",
    "signingkey",
    "sshkey",
    "credential",
    "credentials",
    "cookie",
    "authorization",
    "authheader",
    "signature",
)
_SECRET_KEYS = frozenset({"auth", "bearer", "pass", "pin", "otp", "pwd", "key"})
_SEPARATORS = re.compile(r"[^a-z0-9]")
#: ``db_pass``, ``DB_PASS``, ``dbPass``: a key whose last word is ``pass`` (not ``bypass``).
_PASS_WORD = re.compile(r"(?:^|[^A-Za-z0-9])(?i:pass)$|[a-z0-9]Pass$")
#: A mapping that names a secret in one member and holds it in another:
#: ``{"name": "AWS_SECRET_ACCESS_KEY", "value": ...}`` (container env, HAR headers),
#: ``{"Key": ..., "Value": ...}`` (AWS tags), ``{"ParameterKey": ..., "ParameterValue": ...}``.
_PAIR_NAMES = ("name", "Name", "key", "Key", "ParameterKey", "ParameterName")
_PAIR_VALUES = frozenset({"value", "Value", "ParameterValue"})

# -- the string rules ------------------------------------------------------------------------
#
# Python's re scans fastest when every top-level alternative starts with a literal
# character: it then skips straight to the characters that can start a match. A leading
# group, character class, \b or lookbehind switches that off (several times slower), so each
# alternative below starts with one literal character and a word boundary is checked just
# after it (_START).
#
# In every rule the last group that took part in the match is what gets masked, the rest of
# the match is kept (``postgresql://admin:``, ``X-Amz-Signature=``); a match with no group is
# masked whole. Minimum lengths are at or below each provider's documented ones, so that a
# token cut short (error messages are truncated) is still caught.

#: After a token's first character: the character before that one is not a word character.
_START = r"(?<![A-Za-z0-9_].)"


def _alternation(rules: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern matching any of ``rules``, each of which starts with a literal character.

    Rules that start with the same character are grouped behind it (``s(?:k-...|k_...)``), so
    that at each position re tries only the rules that can start there.
    """
    by_first: dict[str, list[str]] = {}
    for rule in rules:
        by_first.setdefault(rule[0], []).append(rule[1:])
    return re.compile(
        "|".join(f"{re.escape(first)}(?:{'|'.join(rests)})" for first, rests in by_first.items())
    )


#: Credential shapes, case-sensitive.
_TOKEN_RULES = (
    # OpenAI (sk-, sk-proj-, sk-svcacct-, sk-admin-) and Anthropic (sk-ant-api03-,
    # sk-ant-admin01-) keys: long random base62 tails, which hold a digit.
    rf"s{_START}k-(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{{20,}}",
    # Stripe secret and restricted keys (sk_live_, sk_test_, rk_live_, rk_test_), webhook
    # signing secrets (whsec_). Publishable keys (pk_) are public.
    rf"s{_START}k_(?:live|test)_[A-Za-z0-9]{{16,}}",
    rf"r{_START}k_(?:live|test)_[A-Za-z0-9]{{16,}}",
    rf"w{_START}hsec_[A-Za-z0-9]{{24,}}",
    # GitHub: classic tokens, 36 base62 characters after ghp_ (personal), gho_ (OAuth), ghu_
    # (user-to-server), ghs_ (server-to-server), ghr_ (refresh); fine-grained github_pat_.
    rf"g{_START}h[pousr]_[A-Za-z0-9]{{36,}}",
    rf"g{_START}ithub_pat_[A-Za-z0-9_]{{22,}}",
    # GitLab: personal (glpat-), deploy (gldt-), runner (glrt-), CI job (glcbt-), pipeline
    # trigger (glptt-), feed (glft-), incoming mail (glimt-), agent (glagent-), OAuth app
    # secret (gloas-), SCIM (glsoat-), feature-flag client (glffct-) tokens; runner
    # registration tokens (GR1348941).
    rf"g{_START}l(?:pat|dt|rt|cbt|ptt|ft|imt|agent|oas|soat|ffct)-[A-Za-z0-9_.-]{{20,}}",
    rf"G{_START}R1348941[A-Za-z0-9_-]{{20,}}",
    # Slack: bot, user, legacy and configuration tokens (xoxb-, xoxp-, xoxa-, xoxo-, xoxr-,
    # xoxs-, xoxe-; refresh xoxe.xoxp-), app-level tokens (xapp-1-...).
    rf"x{_START}ox[abeoprs](?:\.xox[bp])?-[A-Za-z0-9-]{{10,}}",
    rf"x{_START}app-[0-9]+-[A-Za-z0-9-]{{10,}}",
    # Google: API keys (AIza and 35 more), OAuth access tokens (ya29.), refresh tokens (1//0),
    # OAuth client secrets (GOCSPX-).
    rf"A{_START}Iza[A-Za-z0-9_-]{{35}}",
    rf"y{_START}a29\.[A-Za-z0-9_-]{{20,}}",
    rf"1{_START}//0[A-Za-z0-9_-]{{30,}}",
    rf"G{_START}OCSPX-[A-Za-z0-9_-]{{20,}}",
    # JSON Web Tokens: header.payload.signature, both JSON parts ({" in base64url: eyJ).
    rf"e{_START}yJ[A-Za-z0-9_-]{{8,}}\.eyJ[A-Za-z0-9_-]{{8,}}\.[A-Za-z0-9_-]{{8,}}",
    # HTTP Basic credentials, when they look like base64 (not "Basic setup instructions").
    *(
        rf"{word[0]}{_START}{word[1:]}\s+(?=[A-Za-z0-9+/]*(?:[0-9+/=]|[a-z][A-Z]))[A-Za-z0-9+/]{{8,}}={{0,2}}"
        r"(?![A-Za-z0-9+/=._:-])"
        for word in ("Basic", "basic", "BASIC")
    ),
    # mysql -pPassword: the MySQL and MariaDB clients take a password glued to -p.
    rf"m{_START}(?:ysql|ariadb)[a-z-]*\b[^\n]*?\s-p([^\s\"']+)",
    # PEM (RSA, EC, OPENSSH, ENCRYPTED ...) and PGP private keys, to their END line or the
    # end of the text.
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
)
_TOKENS = _alternation(_TOKEN_RULES)

#: Names whose value is a secret, as the end of an assignment's name: ``password=``,
#: ``DB_PASS=``, ``"client_secret":``, ``aws_secret_access_key =``, ``X-Amz-Signature=``,
#: ``?access_token=``. The short ones count only as a query or fragment parameter (Azure
#: SAS ``sig``, OAuth ``code``, Google ``key``).
_SECRET_NAMES = (
    "password",
    "passwd",
    "passphrase",
    r"p(?<![a-z0-9].)ass",  # pass and pwd as a whole word: db_pass, not bypass
    r"p(?<![a-z0-9].)wd",
    "secret",
    "token",
    "credential",
    "credentials",
    "signature",
    *(
        rf"{word}[_-]?key"
        for word in (
            "api",
            "access",
            "secret",
            "private",
            "ssh",
            "signing",
            "master",
            "encryption",
            "client",
            "account",
        )
    ),
    *(rf"{name[0]}(?<=[?&;#]{name[0]}){name[1:]}" for name in ("sig", "code", "key", "auth", "otp")),
)
_SCHEMES = "bearer|basic|token|digest|bot|oauth|apikey|aws4-hmac-sha256|negotiate|ntlm|dpop"
#: The value of an assignment: quoted (the quotes are kept) or up to a separator, with the
#: scheme of a credential (``token: Bearer ...``).
_ASSIGNED = (
    r"""["']?\s*(?:=>|[:=])\s*"""
    rf"""(?:"([^"\n]*)"|'([^'\n]*)'|((?:(?:{_SCHEMES})\s+)?[^\s"'&,;<>]+))"""
)
_HEADER = rf"""["']?\s*[:=]\s*["']?((?:(?:{_SCHEMES})\s+)?[^\s"',;]+)"""

#: Rules matched on the lower-cased text, so any letter case (``Password``, ``PASSWORD``).
_NAMED_RULES = (
    *(name + _ASSIGNED for name in _SECRET_NAMES),
    # An Authorization header, whatever its scheme (Bearer, Basic, token, AWS4-HMAC-SHA256).
    "authorization" + _HEADER,
    "proxy-authorization" + _HEADER,
    # A Cookie or Set-Cookie header: its whole value, to the end of the line.
    r"""cookie\s*:\s*([^\r\n"']+)""",
    r"""set-cookie\s*:\s*([^\r\n"']+)""",
    # Slack incoming webhooks and workflow triggers: the path is the credential.
    r"hooks\.slack\.com/(?:services|workflows|triggers)/([a-z0-9_/-]+)",
    # Bearer credentials anywhere (not "Bearer Authorization: ...", a header name).
    r"bearer\s+[a-z0-9._~+/=-]{8,}(?![a-z0-9._~+/=:-])",
)
_NAMED = _alternation(_NAMED_RULES)
#: The same rules for text whose lower-cased form may differ in length (non-ASCII).
_NAMED_ANYCASE = re.compile(_NAMED.pattern, re.IGNORECASE)

#: user:password@ in a URL: the password is masked up to the last @ before the host
#: (``postgresql://admin:p@ss@db/app``); the user stays, ``redis://:pw@`` has none.
_USERINFO = re.compile(r"(://[^/?#\s:]*:)[^/?#\s]+(?=@)")

#: AWS access key ids (AKIA long-term, ASIA temporary from STS), and secret access keys,
#: which have no prefix: 40 base64 characters, masked on a line that names AWS or holds a
#: key id. A hex digest (a SHA-1 has one letter case) never matches: a secret key mixes
#: cases and holds a digit, ``/`` or ``+``.
_AWS_KEY_ID = re.compile(rf"A{_START}(?:KIA|SIA)[A-Z0-9]{{16}}(?![A-Za-z0-9])")
#: A run of base64 characters long enough to be a secret key (which is exactly 40 long).
_BASE64_RUN = re.compile(r"[A-Za-z0-9/+]{40,}")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGIT_OR_SIGN = frozenset("0123456789/+")

#: Recent texts and their scrubbed form: URIs and error messages repeat.
_recent: dict[str, str] = {}
_RECENT_LIMIT = 2048
_RECENT_TEXT = 1024
#: Rounds of the rules after the first that changed something (each masks what is left).
_MAX_ROUNDS = 4


def _token_masked(match: re.Match[str]) -> str:
    group = match.lastindex
    if group is None:
        return MASK
    # mysql -p: what lies between the command and -p was consumed by this match, scan it too.
    text, start = match.string, match.start()
    return _TOKENS.sub(_token_masked, text[start : match.start(group)]) + MASK


def _named_masked(text: str) -> str:
    """``text`` with :data:`_NAMED_RULES` applied (matched on its lower-cased form)."""
    if text.isascii():
        subject, rules = text.lower(), _NAMED  # same length, so the same positions
    else:
        subject, rules = text, _NAMED_ANYCASE
    first = rules.search(subject)
    if first is None:
        return text
    parts: list[str] = []
    done = 0
    for match in rules.finditer(subject, first.start()):
        group = match.lastindex
        if group is None:
            parts += (text[done : match.start()], MASK)
            done = match.end()
        else:
            parts += (text[done : match.start(group)], MASK)
            done = match.end(group)
    parts.append(text[done:])
    return "".join(parts)


def _aws_secret_masked(match: re.Match[str]) -> str:
    run = match[0]
    end = match.end()
    if (
        len(run) == 40
        and not match.string.startswith("=", end)  # then a longer, padded base64 text
        and not _LOWER.isdisjoint(run)
        and not _UPPER.isdisjoint(run)
        and not _DIGIT_OR_SIGN.isdisjoint(run)
    ):
        return MASK
    return run


def _aws_masked(text: str) -> str:
    lines = text.split("\n")
    for index, line in enumerate(lines):
        lowered = line.lower()
        if "aws" in lowered or "amazon" in lowered or _AWS_KEY_ID.search(line) is not None:
            line = _AWS_KEY_ID.sub(MASK, line)
            lines[index] = _BASE64_RUN.sub(_aws_secret_masked, line)
    return "\n".join(lines)


def _scrubbed_once(text: str) -> str:
    scrubbed = text
    if _TOKENS.search(scrubbed) is not None:
        scrubbed = _TOKENS.sub(_token_masked, scrubbed)
    if "@" in scrubbed:
        scrubbed = _USERINFO.sub(rf"\1{MASK}", scrubbed)
    scrubbed = _named_masked(scrubbed)
    lowered = scrubbed.lower()
    if "aws" in lowered or "amazon" in lowered or "akia" in lowered or "asia" in lowered:
        scrubbed = _aws_masked(scrubbed)
    return scrubbed


def scrub_text(text: str) -> str:
    """``text`` with credentials masked and everything else kept.

    For every URI and error message that is recorded, and every string of a redacted
    argument copy: ``postgresql://admin:hunter2@db/app`` becomes
    ``postgresql://admin:[REDACTED]@db/app``; a presigned S3 URL keeps its host, path and
    ``x-id`` but not the values of ``X-Amz-Credential``, ``X-Amz-Signature`` and
    ``X-Amz-Security-Token``; provider tokens (GitHub, GitLab, Slack, Stripe, AWS, OpenAI,
    Anthropic, Google), JWTs and private keys are masked wherever they appear. Text with
    nothing to mask comes back unchanged; the answers for recent short texts are kept, so a
    URI or an error message seen again costs one dictionary lookup.
    """
    short = len(text) <= _RECENT_TEXT
    if short:
        cached = _recent.get(text)
        if cached is not None:
            return cached
    scrubbed = _scrubbed_once(text)
    if scrubbed == text:
        scrubbed = text
    else:
        # One rule's mask can complete another rule's match (a password holding a space,
        # masked as a bearer token, leaves a user:password@ to find): go on until nothing
        # changes, so that scrubbing twice is scrubbing once.
        for _ in range(_MAX_ROUNDS):
            again = _scrubbed_once(scrubbed)
            if again == scrubbed:
                break
            scrubbed = again
    if short:
        if len(_recent) >= _RECENT_LIMIT:
            _recent.clear()
        _recent[text] = scrubbed
    return scrubbed


def is_secret_key(key: str) -> bool:
    """``api_key``, ``X-Api-Key``, ``accessToken``, ``password``, ``db_pass``: yes.

    ``max_tokens``, ``author``, ``bypass``: no.
    """
    name = _SEPARATORS.sub("", key.lower())
    return name in _SECRET_KEYS or name.endswith(_SECRET_SUFFIXES) or _PASS_WORD.search(key) is not None


def _secret_members(mapping: dict[Any, Any]) -> set[Any]:
    """The members of ``mapping`` whose values are masked whole.

    Those under a secret's name, and the value of a name/value pair that names a secret
    (``{"name": "AWS_SECRET_ACCESS_KEY", "value": ...}``). In a pair, ``key`` / ``Key``
    holds the name (``{"Key": "Name", "Value": "web"}``), so it is not itself a secret.
    """
    pair = not _PAIR_VALUES.isdisjoint(mapping)
    secret = {
        key
        for key in mapping
        if isinstance(key, str) and is_secret_key(key) and not (pair and key in _PAIR_NAMES)
    }
    if pair:
        for name_key in _PAIR_NAMES:
            name = mapping.get(name_key)
            if isinstance(name, str) and is_secret_key(name):
                secret.update(_PAIR_VALUES.intersection(mapping))
                break
    return secret


def redact(value: Any) -> Any:
    """A copy of ``value`` with secrets masked (keys by name, strings by pattern)."""
    if isinstance(value, dict):
        secret = _secret_members(value)
        return {key: MASK if key in secret else redact(item) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return scrub_text(value)
    return value


def redacted_json(arguments: Any) -> str:
    """The redacted arguments as JSON text, cut at :data:`MAX_ARGS_BYTES` (marked ``...``)."""
    text = msgspec.json.encode(redact(arguments))
    if len(text) > MAX_ARGS_BYTES:
        return text[: MAX_ARGS_BYTES - 3].decode("utf-8", "ignore") + "..."
    return text.decode()
