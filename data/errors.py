"""DatasetError: a record or file that cannot be used, said so that it points at the fix.

Every data error names the file, the record index and the field; where the fix is known it says it
(`hint`), e.g. the ROLE_MAP that maps a record's unknown roles; `format_block()` is the one block a
script prints before it exits (no traceback).
"""

from __future__ import annotations

ROLE_MAP_TARGETS = ("system", "user", "assistant", "tool", "function_call")  # function_call: a JSON tool-call turn


class DatasetError(ValueError):
    """A record or data file that cannot be used; the message names the file, record index and field.

    Attributes `source`, `index` (0-based record index) and `field` (e.g. "conversations[3].from")
    hold the same facts for programs; any of them may be None when unknown. `hint` says how to fix
    it when that is known, and `roles` maps each unknown role to the role_map target suggested for
    it. An error that sums up several malformed records (see `load_conversations`) lists them in
    `problems`. `format_block()` is the text a script prints before it exits.
    """

    def __init__(
        self,
        reason: str,
        *,
        source: str | None = None,
        index: int | None = None,
        field: str | None = None,
        hint: str | None = None,
        roles: dict[str, str] | None = None,
    ):
        self.reason, self.source, self.index, self.field = reason, source, index, field
        self.hint, self.roles = hint, dict(roles or {})
        self.problems: list[DatasetError] = []
        where = []
        if source is not None:
            where.append(str(source))
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where + [reason]) + (f"\n  fix: {hint}" if hint else ""))

    def with_context(self, source: str | None = None, index: int | None = None) -> DatasetError:
        """The same error with file and record index filled in where still unknown."""
        return DatasetError(
            self.reason,
            source=self.source if self.source is not None else source,
            index=self.index if self.index is not None else index,
            field=self.field,
            hint=self.hint,
            roles=self.roles,
        )

    def format_block(self, limit: int = 10) -> str:
        """One block for a person: what is wrong where (each malformed record on its own line, the
        first `limit`), then how to fix it (one ROLE_MAP covering every unknown role, and each other
        hint once). No traceback; e.g.

            data error in data/chats.jsonl: 2 malformed records
              record 3, field 'conversations[1].from': unknown role 'bot' (conversations[1].from)
              record 7, field 'messages[2].weight': weight must be 0 (context only, not trained) or 1 ...
            fix: map the unknown roles with ROLE_MAP=bot:assistant (or the --role_map flag)
        """
        problems = self.problems or [self]
        head = "data error" + (f" in {self.source}" if self.source is not None else "")
        lines = [head + (f": {len(problems)} malformed records" if self.problems else "")]
        for problem in problems[:limit]:
            where = [f"record {problem.index}"] if problem.index is not None else []
            where += [f"field {problem.field!r}"] if problem.field is not None else []
            lines.append("  " + ", ".join(where) + (": " if where else "") + problem.reason)
        if len(problems) > limit:
            lines.append(f"  ... and {len(problems) - limit} more")
        lines += [f"fix: {hint}" for hint in fix_hints(problems)]
        return "\n".join(lines)


def fix_hints(problems: list[DatasetError]) -> list[str]:
    """Each way to fix `problems` once: one ROLE_MAP for all their unknown roles, then the other hints."""
    roles = {name: target for p in problems for name, target in p.roles.items()}
    hints = [role_map_hint(roles)] if roles else []
    return hints + list(dict.fromkeys(p.hint for p in problems if p.hint and not p.roles))


def role_map_hint(roles: dict[str, str]) -> str:
    """How to map unknown roles: one ROLE_MAP for all of them (a role with no clear meaning gets
    "user", and the hint says to check it)."""
    pairs = ",".join(f"{name}:{target or 'user'}" for name, target in roles.items())
    unsure = [name for name, target in roles.items() if not target]
    return (
        f"map the unknown roles with ROLE_MAP={pairs} (or the --role_map flag); targets: {', '.join(ROLE_MAP_TARGETS)}"
        + (f"; check {', '.join(repr(n) for n in unsure)}: user or assistant, as the turns are" if unsure else "")
    )


# Suggested role_map targets for role names seen in public datasets (None: no clear meaning).
_ROLE_SUGGESTIONS = {
    "system": ("developer", "sys", "system_prompt", "context"),
    "user": ("human", "person", "customer", "prompter", "question", "client", "input", "usr"),
    "assistant": ("model", "bot", "ai", "chatbot", "gpt4", "chatgpt", "claude", "agent", "answer", "output",
                  "response", "reply", "ai_assistant"),
    "tool": ("function", "ipython", "tool_response", "tool_result", "function_response", "function_result",
             "environment", "observations", "tool_output"),
    "function_call": ("tool_call", "tool_calls", "function_calls", "call", "action"),
}


def suggest_role(name: str) -> str | None:
    """The role_map target a role name most likely means ("bot" -> assistant, "tool_call" ->
    function_call, "tool_response" -> tool), or None."""
    key = name.lower().strip()
    for target, names in _ROLE_SUGGESTIONS.items():
        if key in names:
            return target
    return None
