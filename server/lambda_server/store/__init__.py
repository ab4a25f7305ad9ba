"""PostgreSQL: the pool, the session store, migrations and the embedded server."""
