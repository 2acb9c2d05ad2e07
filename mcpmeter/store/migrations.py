"""Schema migrations, by name, in order. Each runs once per store, in its own transaction.

The names are the contract between backends: every store records the same names in its
``schema_version`` table, whatever SQL it runs for them. Each migration carries the SQL of
both engines (a test checks every migration has both). The Postgres spelling: ids are
``BIGINT ... GENERATED AS IDENTITY``, REAL is ``DOUBLE PRECISION``, INTEGER is ``BIGINT``
(SQLite's integers are 64-bit), and every TEXT column is ``COLLATE "C"`` so text sorts and
compares byte-wise as in SQLite (ISO timestamps compare as time, ``ORDER BY`` agrees).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "0001_calls",
        (
            """
            CREATE TABLE calls (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                ts TEXT NOT NULL,
                latency_ms REAL,
                project_id TEXT,
                agent_id TEXT,
                session_id TEXT NOT NULL,
                tags TEXT NOT NULL DEFAULT '{}',
                server TEXT,
                transport TEXT NOT NULL,
                upstream TEXT NOT NULL,
                direction TEXT NOT NULL,
                method TEXT NOT NULL,
                tool TEXT,
                jsonrpc_id TEXT NOT NULL,
                request_id TEXT,
                trace_id TEXT,
                request_bytes INTEGER NOT NULL,
                response_bytes INTEGER,
                status TEXT NOT NULL,
                error_code INTEGER,
                error_message TEXT,
                cost_usd REAL,
                client_name TEXT,
                client_version TEXT,
                server_version TEXT,
                protocol_version TEXT,
                hash TEXT
            )
            """,
            # Each index costs every insert about 0.8 us: only those the read paths need.
            # tail and export by time, report and budgets by project/agent, the ledger join.
            "CREATE INDEX calls_ts ON calls (ts)",
            "CREATE INDEX calls_project_agent_ts ON calls (project_id, agent_id, ts)",
            "CREATE INDEX calls_request_id ON calls (request_id) WHERE request_id IS NOT NULL",
        ),
        (
            # Ids are assigned only by the store, inside the chain lock: never by hand.
            """
            CREATE TABLE calls (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                ts TEXT COLLATE "C" NOT NULL,
                latency_ms DOUBLE PRECISION,
                project_id TEXT COLLATE "C",
                agent_id TEXT COLLATE "C",
                session_id TEXT COLLATE "C" NOT NULL,
                tags TEXT COLLATE "C" NOT NULL DEFAULT '{}',
                server TEXT COLLATE "C",
                transport TEXT COLLATE "C" NOT NULL,
                upstream TEXT COLLATE "C" NOT NULL,
                direction TEXT COLLATE "C" NOT NULL,
                method TEXT COLLATE "C" NOT NULL,
                tool TEXT COLLATE "C",
                jsonrpc_id TEXT COLLATE "C" NOT NULL,
                request_id TEXT COLLATE "C",
                trace_id TEXT COLLATE "C",
                request_bytes BIGINT NOT NULL,
                response_bytes BIGINT,
                status TEXT COLLATE "C" NOT NULL,
                error_code BIGINT,
                error_message TEXT COLLATE "C",
                cost_usd DOUBLE PRECISION,
                client_name TEXT COLLATE "C",
                client_version TEXT COLLATE "C",
                server_version TEXT COLLATE "C",
                protocol_version TEXT COLLATE "C",
                hash TEXT COLLATE "C"
            )
            """,
            "CREATE INDEX calls_ts ON calls (ts)",
            "CREATE INDEX calls_project_agent_ts ON calls (project_id, agent_id, ts)",
            "CREATE INDEX calls_request_id ON calls (request_id) WHERE request_id IS NOT NULL",
        ),
    ),
    Migration(
        2,
        "0002_ledger_and_prices",
        (
            # The LLM side of the join: one row per LLM call, keyed by source + request_id.
            """
            CREATE TABLE llm_calls (
                id INTEGER PRIMARY KEY,
                ts TEXT NOT NULL,
                agent_id TEXT,
                project_id TEXT,
                request_id TEXT NOT NULL,
                model TEXT NOT NULL,
                prompt_tokens INTEGER NOT NULL DEFAULT 0,
                completion_tokens INTEGER NOT NULL DEFAULT 0,
                cached_tokens INTEGER NOT NULL DEFAULT 0,
                source TEXT NOT NULL DEFAULT 'manual',
                tags TEXT NOT NULL DEFAULT '{}',
                UNIQUE (source, request_id)
            )
            """,
            "CREATE INDEX llm_calls_request_id ON llm_calls (request_id)",
            "CREATE INDEX llm_calls_ts ON llm_calls (ts)",
            "CREATE INDEX llm_calls_project_agent_ts ON llm_calls (project_id, agent_id, ts)",
            # Dated prices: a row applies from effective_from until the next row of the same
            # model (or tool pattern); history re-prices when a price is added, no row rewritten.
            """
            CREATE TABLE model_prices (
                model TEXT NOT NULL,
                effective_from TEXT NOT NULL,
                input_per_mtok REAL NOT NULL,
                output_per_mtok REAL NOT NULL,
                cached_per_mtok REAL,
                source TEXT NOT NULL DEFAULT 'manual',
                PRIMARY KEY (model, effective_from)
            )
            """,
            """
            CREATE TABLE tool_prices (
                pattern TEXT NOT NULL,
                effective_from TEXT NOT NULL,
                per_call REAL NOT NULL DEFAULT 0,
                per_kb REAL NOT NULL DEFAULT 0,
                source TEXT NOT NULL DEFAULT 'manual',
                PRIMARY KEY (pattern, effective_from)
            )
            """,
        ),
        (
            """
            CREATE TABLE llm_calls (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                ts TEXT COLLATE "C" NOT NULL,
                agent_id TEXT COLLATE "C",
                project_id TEXT COLLATE "C",
                request_id TEXT COLLATE "C" NOT NULL,
                model TEXT COLLATE "C" NOT NULL,
                prompt_tokens BIGINT NOT NULL DEFAULT 0,
                completion_tokens BIGINT NOT NULL DEFAULT 0,
                cached_tokens BIGINT NOT NULL DEFAULT 0,
                source TEXT COLLATE "C" NOT NULL DEFAULT 'manual',
                tags TEXT COLLATE "C" NOT NULL DEFAULT '{}',
                UNIQUE (source, request_id)
            )
            """,
            "CREATE INDEX llm_calls_request_id ON llm_calls (request_id)",
            "CREATE INDEX llm_calls_ts ON llm_calls (ts)",
            "CREATE INDEX llm_calls_project_agent_ts ON llm_calls (project_id, agent_id, ts)",
            """
            CREATE TABLE model_prices (
                model TEXT COLLATE "C" NOT NULL,
                effective_from TEXT COLLATE "C" NOT NULL,
                input_per_mtok DOUBLE PRECISION NOT NULL,
                output_per_mtok DOUBLE PRECISION NOT NULL,
                cached_per_mtok DOUBLE PRECISION,
                source TEXT COLLATE "C" NOT NULL DEFAULT 'manual',
                PRIMARY KEY (model, effective_from)
            )
            """,
            """
            CREATE TABLE tool_prices (
                pattern TEXT COLLATE "C" NOT NULL,
                effective_from TEXT COLLATE "C" NOT NULL,
                per_call DOUBLE PRECISION NOT NULL DEFAULT 0,
                per_kb DOUBLE PRECISION NOT NULL DEFAULT 0,
                source TEXT COLLATE "C" NOT NULL DEFAULT 'manual',
                PRIMARY KEY (pattern, effective_from)
            )
            """,
        ),
    ),
    Migration(
        3,
        "0003_spill_loads",
        (
            # Spill files already loaded back, by content hash: loading one twice adds nothing.
            """
            CREATE TABLE spill_loads (
                file_id TEXT PRIMARY KEY,
                rows INTEGER NOT NULL,
                loaded_at TEXT NOT NULL
            )
            """,
        ),
        (
            """
            CREATE TABLE spill_loads (
                file_id TEXT COLLATE "C" PRIMARY KEY,
                rows BIGINT NOT NULL,
                loaded_at TEXT COLLATE "C" NOT NULL
            )
            """,
        ),
    ),
    Migration(
        4,
        "0004_call_args",
        (
            # A redacted copy of the arguments, stored only with `wrap --record-args`.
            "ALTER TABLE calls ADD COLUMN args TEXT",
        ),
        ('ALTER TABLE calls ADD COLUMN args TEXT COLLATE "C"',),
    ),
    Migration(
        5,
        "0005_budgets",
        (
            # Budgets set with `mcpmeter budget set`: they apply to every wrap on the store.
            """
            CREATE TABLE budgets (
                scope TEXT NOT NULL,
                subject TEXT NOT NULL,
                period TEXT NOT NULL DEFAULT 'total',
                limit_usd REAL,
                limit_calls INTEGER,
                includes_llm INTEGER NOT NULL DEFAULT 0,
                warn_at REAL NOT NULL DEFAULT 0.8,
                created_at TEXT NOT NULL,
                PRIMARY KEY (scope, subject)
            )
            """,
            # What each subject spent in each window (shared by every proxy on the store);
            # the limits last enforced are kept for `tail` and `budget show`.
            """
            CREATE TABLE budget_spend (
                scope TEXT NOT NULL,
                subject TEXT NOT NULL,
                period TEXT NOT NULL,
                period_start TEXT NOT NULL,
                spent_usd REAL NOT NULL DEFAULT 0,
                calls INTEGER NOT NULL DEFAULT 0,
                limit_usd REAL,
                limit_calls INTEGER,
                PRIMARY KEY (scope, subject, period, period_start)
            )
            """,
            """
            CREATE TABLE budget_events (
                id INTEGER PRIMARY KEY,
                ts TEXT NOT NULL,
                scope TEXT NOT NULL,
                subject TEXT NOT NULL,
                period TEXT NOT NULL,
                period_start TEXT NOT NULL,
                kind TEXT NOT NULL,
                spent_usd REAL,
                calls INTEGER,
                limit_usd REAL,
                limit_calls INTEGER,
                message TEXT NOT NULL
            )
            """,
            "CREATE INDEX budget_events_ts ON budget_events (ts)",
            """
            CREATE VIEW budget_status AS
            SELECT s.scope, s.subject, s.period, s.spent_usd AS spent, s.limit_usd AS limit_value,
                   'usd' AS unit
            FROM budget_spend s
            WHERE s.limit_usd IS NOT NULL AND s.period_start = (
                SELECT max(x.period_start) FROM budget_spend x
                WHERE x.scope = s.scope AND x.subject = s.subject AND x.period = s.period)
            UNION ALL
            SELECT s.scope, s.subject, s.period, s.calls AS spent, s.limit_calls AS limit_value,
                   'calls' AS unit
            FROM budget_spend s
            WHERE s.limit_calls IS NOT NULL AND s.period_start = (
                SELECT max(x.period_start) FROM budget_spend x
                WHERE x.scope = s.scope AND x.subject = s.subject AND x.period = s.period)
            """,
        ),
        (
            """
            CREATE TABLE budgets (
                scope TEXT COLLATE "C" NOT NULL,
                subject TEXT COLLATE "C" NOT NULL,
                period TEXT COLLATE "C" NOT NULL DEFAULT 'total',
                limit_usd DOUBLE PRECISION,
                limit_calls BIGINT,
                includes_llm BIGINT NOT NULL DEFAULT 0,
                warn_at DOUBLE PRECISION NOT NULL DEFAULT 0.8,
                created_at TEXT COLLATE "C" NOT NULL,
                PRIMARY KEY (scope, subject)
            )
            """,
            """
            CREATE TABLE budget_spend (
                scope TEXT COLLATE "C" NOT NULL,
                subject TEXT COLLATE "C" NOT NULL,
                period TEXT COLLATE "C" NOT NULL,
                period_start TEXT COLLATE "C" NOT NULL,
                spent_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
                calls BIGINT NOT NULL DEFAULT 0,
                limit_usd DOUBLE PRECISION,
                limit_calls BIGINT,
                PRIMARY KEY (scope, subject, period, period_start)
            )
            """,
            """
            CREATE TABLE budget_events (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
                ts TEXT COLLATE "C" NOT NULL,
                scope TEXT COLLATE "C" NOT NULL,
                subject TEXT COLLATE "C" NOT NULL,
                period TEXT COLLATE "C" NOT NULL,
                period_start TEXT COLLATE "C" NOT NULL,
                kind TEXT COLLATE "C" NOT NULL,
                spent_usd DOUBLE PRECISION,
                calls BIGINT,
                limit_usd DOUBLE PRECISION,
                limit_calls BIGINT,
                message TEXT COLLATE "C" NOT NULL
            )
            """,
            "CREATE INDEX budget_events_ts ON budget_events (ts)",
            """
            CREATE VIEW budget_status AS
            SELECT s.scope, s.subject, s.period, s.spent_usd AS spent, s.limit_usd AS limit_value,
                   'usd' AS unit
            FROM budget_spend s
            WHERE s.limit_usd IS NOT NULL AND s.period_start = (
                SELECT max(x.period_start) FROM budget_spend x
                WHERE x.scope = s.scope AND x.subject = s.subject AND x.period = s.period)
            UNION ALL
            SELECT s.scope, s.subject, s.period, s.calls AS spent, s.limit_calls AS limit_value,
                   'calls' AS unit
            FROM budget_spend s
            WHERE s.limit_calls IS NOT NULL AND s.period_start = (
                SELECT max(x.period_start) FROM budget_spend x
                WHERE x.scope = s.scope AND x.subject = s.subject AND x.period = s.period)
            """,
        ),
    ),
    Migration(
        6,
        "0006_audit_writers",
        (
            # Per audit writer, the number of its last committed write; and spilled writes
            # found committed after all. Together they make a spill load exactly once.
            """
            CREATE TABLE audit_writers (
                writer_id TEXT PRIMARY KEY,
                batch INTEGER NOT NULL,
                updated_at TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE spill_voids (
                writer_id TEXT NOT NULL,
                batch INTEGER NOT NULL,
                PRIMARY KEY (writer_id, batch)
            )
            """,
        ),
        (
            """
            CREATE TABLE audit_writers (
                writer_id TEXT COLLATE "C" PRIMARY KEY,
                batch BIGINT NOT NULL,
                updated_at TEXT COLLATE "C" NOT NULL
            )
            """,
            """
            CREATE TABLE spill_voids (
                writer_id TEXT COLLATE "C" NOT NULL,
                batch BIGINT NOT NULL,
                PRIMARY KEY (writer_id, batch)
            )
            """,
        ),
    ),
)
