-- The cleanup's pass finds active sessions past their expiry: an index of active
-- sessions by expiry keeps that a short range scan however many expired sessions
-- wait out their retention.
CREATE INDEX sessions_active_expires_at_idx ON meta.sessions (expires_at) WHERE status = 'active';
