-- Each owner's use of its quotas (MAX_SESSIONS_PER_OWNER, MAX_SCRIPT_BYTES_PER_OWNER) in
-- a few rows, so that Initialize no longer counts the owner's sessions one by one (up to
-- MAX_SESSIONS_PER_OWNER index entries, and their heap pages, per create).
--
-- One row per owner and minute: the owner's ACTIVE sessions whose expires_at falls in
-- that minute, and the bytes they store. Triggers keep it in the transaction that changes
-- meta.sessions, so at every commit it equals
--     SELECT owner, meta.usage_minute(expires_at), count(*), sum(coalesce(stored_bytes, 0))
--     FROM meta.sessions WHERE status = 'active' AND owner IS NOT NULL GROUP BY 1, 2
-- and a row whose count falls to zero is deleted. Expiry by the clock changes nothing
-- here: an owner's unexpired use at now() is the rows from the next minute on, plus its
-- sessions that expire before that minute, counted exactly over sessions_owner_active_idx
-- (store/creates.py). Marking or deleting expired sessions (the cleanup) empties the
-- past minutes.
--
-- Locks: a create's statement changes one row (its owner, the minute now() plus
-- SESSION_EXPIRY_SECONDS falls in), under its owner's advisory lock; the cleanup (one
-- replica at a time) changes many rows, of past minutes. A transaction that waits for a
-- row holds no other row of this table, so the two never deadlock; writers of several
-- rows in one statement take them in (owner, minute) order where the trigger is per
-- statement.

-- The minute a session expires in, by absolute time (date_bin on timestamptz does not
-- depend on the connection's TimeZone, whose offset may not be whole minutes).
CREATE FUNCTION meta.usage_minute(expires_at timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT date_bin('1 minute', expires_at, timestamptz '2000-01-01 00:00:00+00') $$;

CREATE TABLE meta.owner_usage (
    owner    text NOT NULL,
    minute   timestamptz NOT NULL,
    sessions bigint NOT NULL,
    bytes    bigint NOT NULL,
    PRIMARY KEY (owner, minute)
);

-- Adds `sessions` and `bytes` (negative: removes) to each (owner, minute) given, in
-- (owner, minute) order, so that two writers lock shared rows in the same order; a row
-- emptied is deleted.
CREATE FUNCTION meta.owner_usage_change(
    owners text[], minutes timestamptz[], sessions bigint[], bytes bigint[]
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    emptied_owners text[];
    emptied_minutes timestamptz[];
BEGIN
    WITH changed AS (
        INSERT INTO meta.owner_usage AS u (owner, minute, sessions, bytes)
        SELECT d.owner, d.minute, sum(d.sessions), sum(d.bytes)
        FROM unnest(owners, minutes, sessions, bytes) AS d(owner, minute, sessions, bytes)
        GROUP BY d.owner, d.minute
        HAVING sum(d.sessions) <> 0 OR sum(d.bytes) <> 0
        ORDER BY d.owner, d.minute
        ON CONFLICT (owner, minute) DO UPDATE
        SET sessions = u.sessions + excluded.sessions, bytes = u.bytes + excluded.bytes
        RETURNING u.owner, u.minute, u.sessions, u.bytes
    )
    SELECT array_agg(c.owner), array_agg(c.minute) INTO emptied_owners, emptied_minutes
    FROM changed c WHERE c.sessions = 0 AND c.bytes = 0;
    IF emptied_owners IS NOT NULL THEN
        DELETE FROM meta.owner_usage u
        USING unnest(emptied_owners, emptied_minutes) AS e(owner, minute)
        WHERE u.owner = e.owner AND u.minute = e.minute AND u.sessions = 0 AND u.bytes = 0;
    END IF;
END
$$;

-- Creates: once a statement (a batch of creates is one statement, one owner, one minute).
CREATE FUNCTION meta.owner_usage_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO meta.owner_usage AS u (owner, minute, sessions, bytes)
    SELECT n.owner, meta.usage_minute(n.expires_at), count(*), sum(coalesce(n.stored_bytes, 0))
    FROM inserted n
    WHERE n.status = 'active' AND n.owner IS NOT NULL
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (owner, minute) DO UPDATE
    SET sessions = u.sessions + excluded.sessions, bytes = u.bytes + excluded.bytes;
    RETURN NULL;
END
$$;

-- The cleanup's deletes (sessions marked expired already, mostly: nothing to do).
CREATE FUNCTION meta.owner_usage_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d record;
BEGIN
    SELECT array_agg(o.owner) AS owners, array_agg(meta.usage_minute(o.expires_at)) AS minutes,
           array_agg(-1::bigint) AS sessions, array_agg(-coalesce(o.stored_bytes, 0)) AS bytes
    INTO d
    FROM deleted o
    WHERE o.status = 'active' AND o.owner IS NOT NULL;
    IF d.owners IS NOT NULL THEN
        PERFORM meta.owner_usage_change(d.owners, d.minutes, d.sessions, d.bytes);
    END IF;
    RETURN NULL;
END
$$;

-- Adds one delta to one (owner, minute); a row emptied is deleted.
CREATE FUNCTION meta.owner_usage_add(
    owner_ text, minute_ timestamptz, sessions_ bigint, bytes_ bigint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    left_sessions bigint;
    left_bytes bigint;
BEGIN
    INSERT INTO meta.owner_usage AS u (owner, minute, sessions, bytes)
    VALUES (owner_, minute_, sessions_, bytes_)
    ON CONFLICT (owner, minute) DO UPDATE
    SET sessions = u.sessions + excluded.sessions, bytes = u.bytes + excluded.bytes
    RETURNING u.sessions, u.bytes INTO left_sessions, left_bytes;
    IF left_sessions = 0 AND left_bytes = 0 THEN
        DELETE FROM meta.owner_usage WHERE owner = owner_ AND minute = minute_;
    END IF;
END
$$;

-- An update of the four columns the use depends on, row by row: a statement-level
-- trigger with transition tables cannot name columns, and would run for every claim
-- and count flush of Execute, which change none of them. The row's old place is left
-- before its new one is taken, in (owner, minute) order.
CREATE FUNCTION meta.owner_usage_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    counted_before boolean := OLD.status = 'active' AND OLD.owner IS NOT NULL;
    counted_after boolean := NEW.status = 'active' AND NEW.owner IS NOT NULL;
    old_minute timestamptz := meta.usage_minute(OLD.expires_at);
    new_minute timestamptz := meta.usage_minute(NEW.expires_at);
BEGIN
    IF counted_before AND counted_after AND (OLD.owner, old_minute) = (NEW.owner, new_minute) THEN
        PERFORM meta.owner_usage_add(OLD.owner, old_minute, 0,
                                     coalesce(NEW.stored_bytes, 0) - coalesce(OLD.stored_bytes, 0));
    ELSIF counted_before AND counted_after AND (NEW.owner, new_minute) < (OLD.owner, old_minute) THEN
        PERFORM meta.owner_usage_add(NEW.owner, new_minute, 1, coalesce(NEW.stored_bytes, 0));
        PERFORM meta.owner_usage_add(OLD.owner, old_minute, -1, -coalesce(OLD.stored_bytes, 0));
    ELSE
        IF counted_before THEN
            PERFORM meta.owner_usage_add(OLD.owner, old_minute, -1, -coalesce(OLD.stored_bytes, 0));
        END IF;
        IF counted_after THEN
            PERFORM meta.owner_usage_add(NEW.owner, new_minute, 1, coalesce(NEW.stored_bytes, 0));
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION meta.owner_usage_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM meta.owner_usage;
    RETURN NULL;
END
$$;

-- No session changes while the rows are counted and the triggers created.
LOCK TABLE meta.sessions IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER sessions_owner_usage_insert AFTER INSERT ON meta.sessions
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION meta.owner_usage_inserted();
CREATE TRIGGER sessions_owner_usage_delete AFTER DELETE ON meta.sessions
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION meta.owner_usage_deleted();
CREATE TRIGGER sessions_owner_usage_update
    AFTER UPDATE OF status, expires_at, stored_bytes, owner ON meta.sessions
    FOR EACH ROW
    WHEN ((OLD.status = 'active' AND OLD.owner IS NOT NULL
           OR NEW.status = 'active' AND NEW.owner IS NOT NULL)
          AND (OLD.status, OLD.expires_at, OLD.stored_bytes, OLD.owner)
              IS DISTINCT FROM (NEW.status, NEW.expires_at, NEW.stored_bytes, NEW.owner))
    EXECUTE FUNCTION meta.owner_usage_updated();
CREATE TRIGGER sessions_owner_usage_truncate AFTER TRUNCATE ON meta.sessions
    FOR EACH STATEMENT EXECUTE FUNCTION meta.owner_usage_truncated();

INSERT INTO meta.owner_usage (owner, minute, sessions, bytes)
SELECT owner, meta.usage_minute(expires_at), count(*), sum(coalesce(stored_bytes, 0))
FROM meta.sessions
WHERE status = 'active' AND owner IS NOT NULL
GROUP BY 1, 2;
