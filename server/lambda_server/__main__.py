"""`python -m lambda_server`: serve, or `migrate` and exit."""

from __future__ import annotations

from lambda_server.app import main

main()
