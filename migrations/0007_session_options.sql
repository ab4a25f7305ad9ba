-- A session's options (InitializeRequest.options, or the original service's context
-- keys), resolved at Initialize with the server's defaults filled in:
-- {"timeout_seconds", "memory_mb", "max_processes", "cache_ttl_seconds"}. Execute reads
-- them from its claim instead of parsing the context on every call. NULL for a session
-- stored before this migration: its options are read from its context's keys.
ALTER TABLE meta.sessions ADD COLUMN options jsonb;
