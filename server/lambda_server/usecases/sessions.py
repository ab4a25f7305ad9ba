"""GetSession: what is stored about a session, its options resolved."""

from __future__ import annotations

from dataclasses import replace

from lambda_server.domain import Caller, Deadline, SessionRecord
from lambda_server.errors import InvalidRequest
from lambda_server.store.sessions import SessionStore
from lambda_server.usecases.inputs import parse_request_id
from lambda_server.usecases.options import SessionOptionsPolicy


class GetSession:
    """Reads a session of the caller's."""

    def __init__(self, sessions: SessionStore, options: SessionOptionsPolicy) -> None:
        self._sessions = sessions
        self._options = options

    async def __call__(self, request_id: str, caller: Caller, deadline: Deadline) -> SessionRecord:
        """The session; another user's is not found, as if it did not exist."""
        record = await self._sessions.get(parse_request_id(request_id), caller.user_id, deadline)
        if record.options is None:  # stored before meta.sessions.options: from its context
            try:
                record = replace(record, options=self._options.from_context(record.context))
            except InvalidRequest:  # out of bounds the server has narrowed since: none shown
                pass
        return record
