-- Sessions: one per Initialize. Columns kept from the service we replace.
-- Expiry is always decided against the database clock (now()).
CREATE SCHEMA IF NOT EXISTS meta;

CREATE TABLE meta.sessions (
    request_id       uuid PRIMARY KEY,
    language_title   varchar(128) NOT NULL,
    user_id          varchar(255),
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    last_executed_at timestamptz,
    execution_count  bigint NOT NULL DEFAULT 0,
    status           varchar(20) NOT NULL DEFAULT 'active'
                     CHECK (status IN ('active', 'expired')),
    context          jsonb NOT NULL DEFAULT '{}'::jsonb,
    script_content   text,
    script_hash      varchar(64),
    compile_options  jsonb,
    compile_status   varchar(20),
    compile_error    text,
    metadata         jsonb
);

CREATE INDEX sessions_expires_at_idx ON meta.sessions (expires_at);
CREATE INDEX sessions_language_title_idx ON meta.sessions (language_title);
CREATE INDEX sessions_user_id_idx ON meta.sessions (user_id);
CREATE INDEX sessions_script_hash_idx ON meta.sessions (script_hash);
