"""The function catalog: ListFunctions, GetFunction, and the registered script Initialize runs."""

from __future__ import annotations

from dataclasses import replace

from lambda_server.auth import require_read_functions
from lambda_server.domain import JSON, Caller, Deadline, FunctionDefinition, FunctionPage, FunctionType
from lambda_server.errors import InvalidRequest, RuntimeNotAvailable, UnknownLanguage
from lambda_server.runtimes.registry import RuntimeRegistry
from lambda_server.store.catalog import MAX_PAGE_SIZE, FunctionCatalog
from lambda_server.usecases.inputs import refuse_control, refuse_nul
from lambda_server.validation import ParamsValidator

# The highest page number the HTTP listing takes (a 32-bit integer's, as protobuf's int32
# page_size): its offset, (page - 1) * per_page, stays well within PostgreSQL's bigint. A
# page past the end answers an empty page; a number past this one is a malformed request,
# as gRPC's ListFunctions refuses a page_token it did not issue.
MAX_PAGE = 2**31 - 1


class Catalog:
    """Reads the catalog for callers, and for Initialize."""

    def __init__(
        self, functions: FunctionCatalog, registry: RuntimeRegistry, params: ParamsValidator
    ) -> None:
        self._functions = functions
        self._registry = registry
        self._params = params

    async def list_functions(
        self,
        language: str,
        function_type: FunctionType | None,
        page_size: int,
        page_token: str,
        caller: Caller,
        deadline: Deadline,
    ) -> FunctionPage:
        """A page of the catalog (see FunctionCatalog.list for paging); never with scripts."""
        require_read_functions(caller)
        refuse_nul(language, "language")
        page = await self._functions.list(language or None, function_type, page_size, page_token, deadline)
        return FunctionPage([self._shown(f, False) for f in page.functions], page.next_page_token)

    async def numbered_page(
        self, language: str, page: int, per_page: int, caller: Caller, deadline: Deadline
    ) -> tuple[list[FunctionDefinition], int]:
        """Page `page` (from 1) of `per_page` functions (at most MAX_PAGE_SIZE) and how many
        match in all: the HTTP API's listing. Never with scripts."""
        require_read_functions(caller)
        refuse_nul(language, "language")
        if not 1 <= page <= MAX_PAGE:
            raise InvalidRequest(
                f"page must be from 1 to {MAX_PAGE}, not {str(page)[:40]}", field="page", limit=str(MAX_PAGE)
            )
        if not 1 <= per_page <= MAX_PAGE_SIZE:
            raise InvalidRequest(
                f"per_page must be from 1 to {MAX_PAGE_SIZE}, not {per_page}",
                field="per_page",
                limit=str(MAX_PAGE_SIZE),
            )
        functions, total = await self._functions.numbered(language or None, page, per_page, deadline)
        return [self._shown(f, False) for f in functions], total

    async def get_function(
        self, language_title: str, caller: Caller, deadline: Deadline
    ) -> FunctionDefinition:
        """A function of the catalog; its script is shown for a dynamic function only."""
        require_read_functions(caller)
        if not language_title:
            raise InvalidRequest("language_title is required", field="language_title")
        refuse_control(language_title, "language_title")
        function = await self._functions.get(language_title, deadline)
        return self._shown(function, function.function_type is FunctionType.DYNAMIC)

    async def registered_script(self, language_title: str, deadline: Deadline) -> tuple[str, dict[str, JSON]]:
        """The catalog function's script, and the session metadata naming it and its params
        schema (compiled now, for Execute to check params against); InvalidRequest when the
        catalog has no script under this title."""
        function = await self._functions.find(language_title, deadline)
        script = function.script if function is not None else None
        if function is None or script is None or not script.strip():
            raise InvalidRequest(
                f"script_content is required: no function of the catalog is named {language_title[:128]!r}",
                field="script_content",
            )
        metadata: dict[str, JSON] = {
            "function": {
                "id": function.id,
                "language_title": function.language_title,
                "version": function.version,
            }
        }
        if function.params_schema is not None:
            metadata["params_schema"] = function.params_schema
            metadata["params_schema_key"] = self._params.prepare(function.params_schema)
        return script, metadata

    def _shown(self, function: FunctionDefinition, with_script: bool) -> FunctionDefinition:
        try:
            self._registry.resolve(function.language_title)
            available = True
        except (RuntimeNotAvailable, UnknownLanguage):
            available = False
        return replace(function, script=function.script if with_script else None, available=available)
