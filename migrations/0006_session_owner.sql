-- Whom a session is billed to (Caller.owner: 'user:<sub>' or 'address:<ip>') and the
-- bytes it stores (script and context), so that Initialize can hold each owner to
-- MAX_SESSIONS_PER_OWNER and MAX_SCRIPT_BYTES_PER_OWNER.
ALTER TABLE meta.sessions ADD COLUMN owner text;
ALTER TABLE meta.sessions ADD COLUMN stored_bytes bigint;

-- Active sessions made before this migration: a user's are billed to the user; an
-- anonymous caller's address was never stored, so those stay unbilled until they
-- expire (SESSION_EXPIRY_SECONDS after their Initialize).
UPDATE meta.sessions
SET owner = 'user:' || user_id,
    stored_bytes = coalesce(octet_length(script_content), 0) + octet_length(context::text)
WHERE status = 'active' AND expires_at > now() AND user_id IS NOT NULL;

-- An owner's use is counted over this index alone (an index-only scan once vacuum has
-- seen the rows): its unexpired active sessions, at most MAX_SESSIONS_PER_OWNER of them,
-- whatever the expired ones waiting for the cleanup or their retention.
CREATE INDEX sessions_owner_active_idx ON meta.sessions (owner, expires_at)
    INCLUDE (stored_bytes) WHERE status = 'active';
