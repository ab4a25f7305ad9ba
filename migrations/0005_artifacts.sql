-- Compiled Rust scripts, by script hash, optimization level and toolchain: another
-- replica, or this one after a restart, runs a script without compiling it again.
CREATE TABLE meta.artifacts (
    artifact_key  varchar(200) PRIMARY KEY,
    script_hash   varchar(64) NOT NULL,
    optimization  varchar(20) NOT NULL,
    toolchain     varchar(200) NOT NULL,
    program       bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
