"""Arguments and results never reach the store, the spill file or the logs (unless asked, redacted)."""

from __future__ import annotations

import json
import string
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MCPMETER, PYTHON, call_record, read_rows
from hypothesis import given, settings
from hypothesis import strategies as st
from otlp import attributes, otlp_receiver

from mcpmeter.metering.redact import MASK, is_secret_key, redact, redacted_json, scrub_text
from mcpmeter.store import SQLiteStore

RAW = str(Path(__file__).resolve().parent / "servers" / "raw_server.py")
SECRET = "sk-live-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
PLAIN_SECRET = "correct-horse-battery-staple-7731"  # no pattern would recognise this one


def find_attribute(span: Any, key: str) -> Any:
    return attributes(span.attributes).get(key)


def calls_with_secrets() -> bytes:
    frames = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {
                "name": "whoami",
                "arguments": {
                    "api_key": SECRET,
                    "query": f"look up {PLAIN_SECRET}",
                    "headers": {"Authorization": f"Bearer {SECRET}"},
                    "limit": 5,
                },
            },
        },
    ]
    return b"".join(json.dumps(f).encode() + b"\n" for f in frames)


def run_wrap(env: dict[str, str], *options: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [MCPMETER, "wrap", *options, "--", PYTHON, RAW],
        input=calls_with_secrets(),
        capture_output=True,
        env={**env, "MCPMETER_LOG": "info"},
        timeout=60,
    )


def files_under(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_a_secret_in_arguments_appears_nowhere_in_the_store_or_the_logs(
    meter_env: dict[str, str], db_path: Path
) -> None:
    result = run_wrap(meter_env)
    assert result.returncode == 0, result.stderr
    rows = read_rows(db_path)
    assert [r["tool"] for r in rows] == [None, "whoami"] and rows[1]["args"] is None
    stored = files_under(db_path.parent)  # the database, its WAL and anything beside it
    for secret in (SECRET, PLAIN_SECRET):
        assert secret.encode() not in stored
        assert secret.encode() not in result.stderr
    assert b"frames" in result.stderr  # the log did run


def test_a_secret_in_arguments_appears_nowhere_in_the_spill_file(
    meter_env: dict[str, str], tmp_path: Path
) -> None:
    blocked = tmp_path / "blocked.db"
    blocked.mkdir()  # a directory where the store should be: SQLite cannot open it, rows spill
    result = run_wrap({**meter_env, "MCPMETER_DB": str(blocked)})
    assert result.returncode == 0
    spill = tmp_path / "blocked.db.spill.jsonl"
    assert spill.exists() and b"whoami" in spill.read_bytes()
    for secret in (SECRET, PLAIN_SECRET):
        assert secret.encode() not in spill.read_bytes()
        assert secret.encode() not in result.stderr


def test_record_args_stores_a_redacted_copy_with_secrets_masked(
    meter_env: dict[str, str], db_path: Path
) -> None:
    result = run_wrap(meter_env, "--record-args")
    assert result.returncode == 0, result.stderr
    args = json.loads(str(read_rows(db_path)[1]["args"]))
    assert args == {
        "api_key": MASK,
        "query": f"look up {PLAIN_SECRET}",  # kept: nothing marks it as a secret
        "headers": {"Authorization": MASK},
        "limit": 5,
    }
    assert SECRET.encode() not in files_under(db_path.parent)


def test_recorded_args_are_not_part_of_export(meter_env: dict[str, str], db_path: Path) -> None:
    run_wrap(meter_env, "--record-args")
    out = subprocess.run([MCPMETER, "export", "--db", str(db_path)], capture_output=True, timeout=60).stdout
    assert b'"args"' not in out and b"look up" not in out


@pytest.mark.parametrize(
    "key",
    ["api_key", "X-Api-Key", "accessToken", "password", "db_password", "client_secret", "Authorization"],
)
def test_keys_that_name_a_secret_are_masked(key: str) -> None:
    assert is_secret_key(key)
    assert redact({key: "value"}) == {key: MASK}


@pytest.mark.parametrize("key", ["max_tokens", "author", "query", "sort", "session", "path"])
def test_ordinary_keys_are_kept(key: str) -> None:
    assert not is_secret_key(key)


@pytest.mark.parametrize(
    "text",
    [
        "Bearer abcdefghijklmnop",
        "sk-ant-api03-abcdefghijklmnopqrstuvwx",
        "ghp_" + "a" * 36,
        "github_pat_" + "b" * 40,
        "AKIAABCDEFGHIJKLMNOP",
        "xoxb-1234567890-abcdef",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
    ],
)
def test_credential_shaped_strings_are_masked_wherever_they_appear(text: str) -> None:
    assert redact({"note": f"use {text} please"}) == {"note": f"use {MASK} please"}


def test_a_password_in_a_url_is_masked_and_the_rest_of_the_url_kept() -> None:
    assert redact("postgres://bob:hunter2@db.internal/app") == f"postgres://bob:{MASK}@db.internal/app"


def test_a_long_argument_copy_is_cut_and_marked() -> None:
    text = redacted_json({"blob": "x" * 10_000})
    assert len(text.encode()) <= 4096 and text.endswith("...")


# -- credential shapes -----------------------------------------------------------------------
#
# Example tokens are assembled from parts so that no complete credential-shaped literal sits
# in the repository. Each has the provider's documented prefix and length.

B62 = "aB3dE5fG7hJ9kL1mN2pQ4rS6tU8vW0xYz"  # 33 base62 characters
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"  # AWS's documented example
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"
JWT = "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiIxMjM0NTY3ODkwIn0" + ".c2lnbmF0dXJlLXZhbHVl"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("sk-" + "proj-" + B62 + B62, id="openai-project"),
        pytest.param("sk-" + B62 + "T3BlbkFJ" + B62[:12], id="openai-legacy"),
        pytest.param("sk-ant-" + "api03-" + B62 + B62 + "-AA", id="anthropic"),
        pytest.param("sk_" + "live_" + B62[:24], id="stripe-secret-live"),
        pytest.param("sk_" + "test_" + B62[:24], id="stripe-secret-test"),
        pytest.param("rk_" + "live_" + B62[:24], id="stripe-restricted"),
        pytest.param("whsec_" + B62[:32], id="stripe-webhook-secret"),
        pytest.param("ghp_" + B62 + "zzz", id="github-classic"),
        pytest.param("ghs_" + B62 + "zzz", id="github-server-to-server"),
        pytest.param(
            "github_pat_" + "11ABCDEFG0" + B62[:12] + "_" + B62 + B62[:25], id="github-fine-grained"
        ),
        pytest.param("glpat-" + B62[:20], id="gitlab-personal"),
        pytest.param("gldt-" + B62[:20], id="gitlab-deploy"),
        pytest.param("GR1348941" + B62[:20], id="gitlab-runner-registration"),
        pytest.param("xoxb-" + "1234567890-1234567890123-" + B62[:24], id="slack-bot"),
        pytest.param("xoxp-" + "1234567890-1234567890123-" + B62[:24], id="slack-user"),
        pytest.param("xapp-" + "1-A0123456789-1234567890123-" + B62, id="slack-app-level"),
        pytest.param(AWS_KEY_ID, id="aws-access-key-id"),
        pytest.param("ASIA" + "ZXCVBNMASDFGHJKL", id="aws-temporary-key-id"),
        pytest.param("AIza" + "SyA" + B62[:32], id="google-api-key"),
        pytest.param("ya29." + B62 + B62, id="google-oauth-access-token"),
        pytest.param("GOCSPX-" + B62[:28], id="google-oauth-client-secret"),
        pytest.param(JWT, id="jwt"),
        pytest.param("Bearer " + B62[:20], id="bearer"),
        pytest.param("Basic " + "YWRtaW46aHVudGVyMg==", id="basic"),
        pytest.param(
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----", id="pem"
        ),
        pytest.param(
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
            "-----END OPENSSH PRIVATE KEY-----",
            id="openssh",
        ),
        pytest.param(
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBGPz3s0BCAC\n=Xq3u\n"
            "-----END PGP PRIVATE KEY BLOCK-----",
            id="pgp",
        ),
    ],
)
def test_each_provider_token_shape_is_masked_wherever_it_appears(token: str) -> None:
    assert redact({"note": f"use {token} please"}) == {"note": f"use {MASK} please"}
    assert scrub_text(f"error: ({token})") == f"error: ({MASK})"


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        pytest.param(
            "postgresql://admin:hunter2@db.internal:5432/app",
            f"postgresql://admin:{MASK}@db.internal:5432/app",
            id="dsn-password",
        ),
        pytest.param("redis://:hunter2@cache:6379/0", f"redis://:{MASK}@cache:6379/0", id="redis-no-user"),
        pytest.param(
            "postgres://bob:p@ss@db.internal/app",
            f"postgres://bob:{MASK}@db.internal/app",
            id="password-with-at",
        ),
        pytest.param(
            "https://api.example.com/v1/items?access_token=abc123&page=2",
            f"https://api.example.com/v1/items?access_token={MASK}&page=2",
            id="access-token-parameter",
        ),
        pytest.param(
            "https://maps.example.com/api?key=AbC123xyz&q=paris",
            f"https://maps.example.com/api?key={MASK}&q=paris",
            id="key-parameter",
        ),
        pytest.param(
            "https://acct.blob.core.windows.net/c/b.txt?sv=2022-11-02&sp=r&sig=abc%2Fdef%3D",
            f"https://acct.blob.core.windows.net/c/b.txt?sv=2022-11-02&sp=r&sig={MASK}",
            id="azure-sas-sig",
        ),
        pytest.param(
            "https://app.example.com/callback?code=4%2F0AX4&state=xyz",
            f"https://app.example.com/callback?code={MASK}&state=xyz",
            id="oauth-code",
        ),
        pytest.param(
            "https://hooks.slack.com/services/T00000000/B00000000/" + B62[:24],
            f"https://hooks.slack.com/services/{MASK}",
            id="slack-webhook",
        ),
        pytest.param("Authorization: token " + B62[:16], f"Authorization: {MASK}", id="authorization-token"),
        pytest.param("authorization=Bearer " + B62[:16], f"authorization={MASK}", id="authorization-bearer"),
        pytest.param("Cookie: session=abc123; theme=dark", f"Cookie: {MASK}", id="cookie"),
        pytest.param("mysql -h db -u root -pS3cretPw app", f"mysql -h db -u root -p{MASK} app", id="mysql-p"),
        pytest.param("mysqldump -P 3306 -pS3cretPw app", f"mysqldump -P 3306 -p{MASK} app", id="mysqldump-p"),
        pytest.param("PASSWORD=hunter2 ./start.sh", f"PASSWORD={MASK} ./start.sh", id="env-password"),
        pytest.param("export DB_PASS=hunter2", f"export DB_PASS={MASK}", id="env-db-pass"),
        pytest.param(
            "aws_secret_access_key = " + AWS_SECRET,
            f"aws_secret_access_key = {MASK}",
            id="aws-secret-assigned",
        ),
        pytest.param(
            f"creds {AWS_KEY_ID} {AWS_SECRET}", f"creds {MASK} {MASK}", id="aws-secret-beside-key-id"
        ),
        pytest.param(
            f"AWS login with {AWS_SECRET}", f"AWS login with {MASK}", id="aws-secret-on-an-aws-line"
        ),
        pytest.param(
            '{"client_secret": "a b c", "id": 7}', f'{{"client_secret": "{MASK}", "id": 7}}', id="json"
        ),
        pytest.param("'password' => 'hunter2'", f"'password' => '{MASK}'", id="php-array"),
    ],
)
def test_secrets_in_urls_headers_and_assignments_are_masked_and_the_rest_kept(
    text: str, scrubbed: str
) -> None:
    assert scrub_text(text) == scrubbed
    assert redact({"note": text}) == {"note": scrubbed}


def test_a_presigned_s3_url_keeps_its_path_and_plain_parameters_for_grouping() -> None:
    url = (
        "https://reports.s3.eu-west-1.amazonaws.com/2024/q1.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={AWS_KEY_ID}%2F20240101%2Feu-west-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=300&X-Amz-Security-Token=IQoJb3JpZ2luX2VjE"
        "&X-Amz-SignedHeaders=host&X-Amz-Signature=" + "9f" * 32 + "&x-id=GetObject"
    )
    assert scrub_text(url) == (
        "https://reports.s3.eu-west-1.amazonaws.com/2024/q1.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={MASK}&X-Amz-Date=20240101T000000Z&X-Amz-Expires=300"
        f"&X-Amz-Security-Token={MASK}&X-Amz-SignedHeaders=host&X-Amz-Signature={MASK}&x-id=GetObject"
    )


@pytest.mark.parametrize(
    "text",
    [
        "Method not found: resources/read",
        "file:///home/ana/projects/mcpmeter/README.md",
        "https://example.com/docs/getting-started?page=2&lang=en#install",
        "max_tokens=4096 temperature=0.2 author=bob",
        "the token expired; ask the author for a new key",
        "Basic setup instructions are in the guide",
        "bypass=1 compass=north secret_name=prod-db token_count=12",
        "550e8400-e29b-41d4-a716-446655440000",
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "commit 3f786850e387550fdab836ed7e6dc881de23001b on aws-sdk",
        "/var/lib/mcpmeter/audit.db and C:\\Users\\ana\\AppData\\Local\\Temp\\x.txt",
        "ssh://git@github.com/acme/repo.git and mailto:ana@example.com",
        "mysql -P3306 -h db.internal app",
        "task-2024-05-01-report-generation",
    ],
)
def test_ordinary_text_ids_hashes_and_paths_are_kept(text: str) -> None:
    assert scrub_text(text) == text
    assert redact({"note": text}) == {"note": text}


@pytest.mark.parametrize("key", ["pass", "ssh_key", "auth_header", "bearer", "db_pass", "dbPass", "DB_PASS"])
def test_more_keys_that_name_a_secret_are_masked(key: str) -> None:
    assert is_secret_key(key)
    assert redact({key: "value"}) == {key: MASK}


@pytest.mark.parametrize("key", ["bypass", "compass", "passenger", "keyboard", "token_count", "secret_name"])
def test_keys_that_only_contain_a_secret_word_are_kept(key: str) -> None:
    assert not is_secret_key(key)


def test_a_name_value_pair_that_names_a_secret_has_its_value_masked() -> None:
    env = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"},
        {"name": "PATH", "value": "/usr/bin"},
        {"Key": "github_token", "Value": "hunter2"},
        {"ParameterKey": "DbPassword", "ParameterValue": "hunter2"},
        {"name": "Authorization", "value": "hunter2"},  # a HAR header
        {"name": "max_tokens", "value": 5},
        {"Key": "Name", "Value": "web-1"},  # an AWS tag: Key holds a name here
    ]
    assert redact({"env": env}) == {
        "env": [
            {"name": "AWS_SECRET_ACCESS_KEY", "value": MASK},
            {"name": "PATH", "value": "/usr/bin"},
            {"Key": "github_token", "Value": MASK},
            {"ParameterKey": "DbPassword", "ParameterValue": MASK},
            {"name": "Authorization", "value": MASK},
            {"name": "max_tokens", "value": 5},
            {"Key": "Name", "Value": "web-1"},
        ]
    }


def test_text_in_any_script_and_letter_case_is_scrubbed() -> None:
    assert scrub_text("Échec: PassWord=hunter2 für café") == f"Échec: PassWord={MASK} für café"
    assert scrub_text("ошибка x-amz-SIGNATURE=abc") == f"ошибка x-amz-SIGNATURE={MASK}"


# -- properties ------------------------------------------------------------------------------

ALNUM = string.ascii_letters + string.digits


def _tail(size: int) -> st.SearchStrategy[str]:
    """Random base62 text of at least ``size`` characters, with a digit and both cases."""
    return st.text(ALNUM, min_size=size, max_size=size + 12).map(lambda t: "Zq7" + t)


#: (text to embed, the part of it that must not survive)
SECRETS: st.SearchStrategy[tuple[str, str]] = st.one_of(
    _tail(36).map(lambda t: ("ghp_" + t, t)),
    _tail(80).map(lambda t: ("github_pat_" + t, t)),
    _tail(20).map(lambda t: ("glpat-" + t, t)),
    _tail(24).map(lambda t: ("xoxb-123456-" + t, t)),
    _tail(24).map(lambda t: ("xapp-1-A0123-" + t, t)),
    _tail(48).map(lambda t: ("sk-" + t, t)),
    _tail(90).map(lambda t: ("sk-ant-api03-" + t, t)),
    _tail(24).map(lambda t: ("sk_live_" + t, t)),
    _tail(24).map(lambda t: ("rk_test_" + t, t)),
    _tail(32).map(lambda t: ("AIza" + t[:35].ljust(35, "x"), t[:35])),
    _tail(20).map(lambda t: ("Bearer " + t, t)),
    _tail(12).map(lambda t: (f"eyJ{t}.eyJ{t}.{t}", t)),
    _tail(8).map(lambda t: (f"postgresql://admin:{t}@db.internal/app", t)),
    _tail(8).map(lambda t: (f"redis://:{t}@cache:6379", t)),
    _tail(8).map(lambda t: (f"https://x.example/a?access_token={t}&b=1", t)),
    _tail(8).map(lambda t: (f"https://b.s3.amazonaws.com/k?X-Amz-Signature={t}", t)),
    _tail(8).map(lambda t: (f"PASSWORD={t}", t)),
    _tail(8).map(lambda t: (f"mysql -uroot -p{t} app", t)),
    _tail(8).map(lambda t: (f"Authorization: token {t}", t)),
    _tail(8).map(lambda t: (f"-----BEGIN EC PRIVATE KEY-----\n{t}\n-----END EC PRIVATE KEY-----", t)),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=16, max_size=16).map(
        lambda t: ("AKIA" + t, "AKIA" + t)
    ),
    st.text(ALNUM + "/+", min_size=37, max_size=37).map(lambda t: "aZ7" + t).map(lambda t: (f"aws {t}", t)),
)
SEPARATORS = st.sampled_from([" ", "\n", "\t", "(", ")", ", ", "; ", '"', " | "])


@settings(max_examples=300, deadline=None)
@given(before=st.text(max_size=60), after=st.text(max_size=60), sep=SEPARATORS, secret=SECRETS)
def test_no_generated_secret_survives_in_random_text_and_scrubbing_is_idempotent(
    before: str, after: str, sep: str, secret: tuple[str, str]
) -> None:
    embedded, hidden = secret
    text = before + sep + embedded + sep + after
    once = scrub_text(text)
    assert hidden not in once
    assert scrub_text(once) == once
    assert redact([text]) == [once]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["name", "value", "token", "q", "api_key", "note"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200), value=JSON_VALUES)
def test_redaction_is_idempotent(text: str, value: object) -> None:
    assert scrub_text(scrub_text(text)) == scrub_text(text)
    assert redact(redact(value)) == redact(value)


# -- end to end: what a real wrap records ----------------------------------------------------

DSN = "postgresql://admin:hunter2@db.internal:5432/app?sslmode=require"
SIGNATURE = "7c1f" * 16
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr" + "Zq7x" * 8
PRESIGNED = (
    "https://reports.s3.eu-west-1.amazonaws.com/2024/q1.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential={AWS_KEY_ID}%2F20240101%2Feu-west-1%2Fs3%2Faws4_request"
    f"&X-Amz-Security-Token={SESSION_TOKEN}&X-Amz-Signature={SIGNATURE}&x-id=GetObject"
)
ERROR_TEXT = f"cannot reach {DSN}: connection refused"
#: What must appear nowhere: the password, the signature, the session token, the key id.
LEAKS = ("hunter2", SIGNATURE, SESSION_TOKEN, AWS_KEY_ID)


def reads_with_credentials() -> bytes:
    frames = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}},
        {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": DSN}},
        {"jsonrpc": "2.0", "id": 3, "method": "resources/read", "params": {"uri": PRESIGNED}},
        {
            "jsonrpc": "2.0",
            "id": 4,
            "method": "tools/call",
            "params": {"name": "error", "arguments": {"code": -32000, "message": ERROR_TEXT}},
        },
    ]
    return b"".join(json.dumps(f).encode() + b"\n" for f in frames)


def test_credentials_in_resource_uris_and_error_messages_reach_neither_the_store_nor_the_collector(
    meter_env: dict[str, str], db_path: Path
) -> None:
    env = {k: v for k, v in meter_env.items() if not k.startswith("OTEL_")}
    with otlp_receiver() as receiver:
        result = subprocess.run(
            [MCPMETER, "wrap", "--otlp-endpoint", receiver.url, "--", PYTHON, RAW],
            input=reads_with_credentials(),
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        got = receiver.wait_for(lambda got: len(got.spans) >= 4)
    # The client got every answer: the server saw the URIs as sent (it answers resources/read
    # with "Method not found"), and the error text came back to the client unchanged.
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["id"] for a in answers] == [1, 2, 3, 4]
    assert answers[3]["error"]["message"] == ERROR_TEXT

    rows = {r["jsonrpc_id"]: r for r in read_rows(db_path)}
    assert rows["2"]["tool"] == f"postgresql://admin:{MASK}@db.internal:5432/app?sslmode=require"
    assert rows["3"]["tool"] == (
        "https://reports.s3.eu-west-1.amazonaws.com/2024/q1.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={MASK}&X-Amz-Security-Token={MASK}&X-Amz-Signature={MASK}&x-id=GetObject"
    )
    assert rows["4"]["status"] == "error" and rows["4"]["tool"] == "error"
    assert rows["4"]["error_message"] == (
        f"cannot reach postgresql://admin:{MASK}@db.internal:5432/app?sslmode=require: connection refused"
    )
    stored = files_under(db_path.parent)
    for leak in LEAKS:
        assert leak.encode() not in stored, leak
        assert leak.encode() not in result.stderr, leak

    reads = [s for s in got.spans if s.name == "resources/read"]
    assert sorted(find_attribute(s, "mcp.resource.uri") for s in reads) == sorted(
        [rows["2"]["tool"], rows["3"]["tool"]]
    )
    failed = next(s for s in got.spans if s.name == "tools/call error")
    assert failed.status.message == rows["4"]["error_message"]
    exported = b"".join(span.SerializeToString() for span in got.spans)
    for leak in LEAKS:
        assert leak.encode() not in exported, leak


def test_export_otlp_scrubs_rows_stored_with_credentials(meter_env: dict[str, str], db_path: Path) -> None:
    # Rows written before URIs and error texts were scrubbed still hold them as they came.
    now = time.time()
    store = SQLiteStore(str(db_path))
    try:
        store.write_calls(
            [
                call_record(ts=now - 20, jsonrpc_id="1", method="resources/read", tool=PRESIGNED),
                call_record(
                    ts=now - 10, jsonrpc_id="2", status="error", error_code=-32000, error_message=ERROR_TEXT
                ),
            ]
        )
    finally:
        store.close()
    env = {k: v for k, v in meter_env.items() if not k.startswith("OTEL_")}
    with otlp_receiver() as receiver:
        result = subprocess.run(
            [MCPMETER, "export", "--format", "otlp", "--endpoint", receiver.url],
            env=env,
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        got = receiver.wait_for(lambda got: len(got.spans) == 2)
    read = next(s for s in got.spans if s.name == "resources/read")
    assert find_attribute(read, "mcp.resource.uri") == scrub_text(PRESIGNED)
    failed = next(s for s in got.spans if s.name == "tools/call search")
    assert failed.status.message == scrub_text(ERROR_TEXT)
    exported = b"".join(span.SerializeToString() for span in got.spans)
    for leak in LEAKS:
        assert leak.encode() not in exported, leak
