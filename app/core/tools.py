"""The tool calls of one session, sans-I/O: which to run, which to hide, what a client may answer.

The model calls a function tool with a `function_call` item (REALTIME.md §6, §7): announced by
`response.output_item.added`, its arguments streamed by `response.function_call_arguments.*`,
complete in `response.output_item.done`, and listed again in `response.done`. The conversation
shows the item (`conversation.item.added` / `.done`), and later the `function_call_output` that
answers it.

* A **server tool's** call is the relay's to run: the session core asks its transport to run
  it, sends the output upstream as a `function_call_output` item, and, once every server call of
  a response is answered and no response is active, asks for the next response. Unless the tier
  shows tool calls, the client sees none of these events, and `response.done` lists none of
  these items: no SDK tries to run a tool it does not have.
* A **client tool's** call is forwarded. The client may answer it once, with a
  `function_call_output` for its `call_id`; an output for any other call is refused
  (`invalid_call_id`), so a client cannot put words in a tool's mouth.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Final

# Calls remembered per session: the open client calls, and the ids of server calls whose echoes
# are hidden. A model makes a handful per turn; past this the oldest are forgotten.
MAX_REMEMBERED: Final = 256


def _bounded_add(store: OrderedDict[str, None], key: str) -> None:
    store[key] = None
    if len(store) > MAX_REMEMBERED:
        store.popitem(last=False)


class ToolCalls:
    """Tool-call bookkeeping for one session.

    Args:
        server_tools: the names of the tools the relay runs for this session.
        show: forward the server tools' events to the client as well.
    """

    def __init__(self, server_tools: frozenset[str], *, show: bool) -> None:
        self.server_tools = server_tools
        self.show = show
        self._server_items: OrderedDict[str, None] = OrderedDict()  # function_call item ids
        self._hidden_items: OrderedDict[str, None] = OrderedDict()  # those and their outputs
        self._out_of_band: OrderedDict[str, None] = OrderedDict()  # conversation "none"
        self._server_calls: OrderedDict[str, None] = OrderedDict()  # their call ids
        self._client_calls: OrderedDict[str, None] = OrderedDict()  # open, unanswered
        self._awaiting: dict[str, set[str]] = {}  # response id -> server calls not answered
        self._response_of: dict[str, str] = {}  # server call id -> its response id
        self.follow_up_due = False  # every call answered: the model should go on

    # -- the model's calls (upstream events)

    def response_created(self, event: dict[str, Any]) -> None:
        """`response.created`: notes a response outside the conversation (`conversation_id`
        null), whose server calls cannot be answered in it."""
        response = event.get("response")
        if isinstance(response, dict) and response.get("conversation_id", "") is None:
            response_id = response.get("id")
            if isinstance(response_id, str):
                _bounded_add(self._out_of_band, response_id)

    def item_added(self, event: dict[str, Any]) -> bool:
        """`response.output_item.added`: whether to show it."""
        item = event.get("item")
        if isinstance(item, dict) and self._is_server_call(item):
            self._hide(item)
            return self.show
        return True

    def arguments(self, event: dict[str, Any]) -> bool:
        """`response.function_call_arguments.*`: whether to show it."""
        item_id = event.get("item_id")
        return self.show or not isinstance(item_id, str) or item_id not in self._server_items

    def hidden(self, item_id: Any) -> bool:
        """Whether `item_id` is a server call's item or its output, which the client never saw
        (and may not retrieve, delete or truncate)."""
        return not self.show and isinstance(item_id, str) and item_id in self._hidden_items

    def _hide(self, item: dict[str, Any]) -> None:
        item_id = item.get("id")
        if isinstance(item_id, str):
            _bounded_add(self._hidden_items, item_id)
            if item.get("type") == "function_call":
                _bounded_add(self._server_items, item_id)

    def item_done(self, event: dict[str, Any]) -> tuple[bool, tuple[str, str, str] | None]:
        """`response.output_item.done`: whether to show it, and the server call to run."""
        item = event.get("item")
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return True, None
        call_id, name = item.get("call_id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            return True, None
        if name not in self.server_tools:
            _bounded_add(self._client_calls, call_id)
            return True, None
        self._hide(item)
        _bounded_add(self._server_calls, call_id)
        response_id = event.get("response_id")
        if isinstance(response_id, str) and response_id in self._out_of_band:  # no conversation
            return self.show, None
        arguments = item.get("arguments")
        if isinstance(response_id, str):
            self._awaiting.setdefault(response_id, set()).add(call_id)
            self._response_of[call_id] = response_id
        return self.show, (call_id, name, arguments if isinstance(arguments, str) else "")

    def conversation_item(self, event: dict[str, Any]) -> bool:
        """`conversation.item.*`: whether to show it (not a server call, nor its output)."""
        item = event.get("item")
        if self.show or not isinstance(item, dict):
            return True
        call_id = item.get("call_id")
        if self._is_server_call(item) or (
            item.get("type") == "function_call_output"
            and isinstance(call_id, str)
            and call_id in self._server_calls
        ):
            self._hide(item)
            return False
        return True

    def response_done(self, event: dict[str, Any], text: str) -> str:
        """`response.done`: the text to show, without the server calls; notes the end."""
        response = event.get("response")
        if not isinstance(response, dict):
            return text
        response_id = response.get("id")
        if isinstance(response_id, str) and response_id in self._awaiting:
            if response.get("status") == "cancelled":  # a barge-in: the user speaks next
                self._forget(response_id)
            elif not self._awaiting[response_id]:  # answered before the response ended
                del self._awaiting[response_id]
                self.follow_up_due = True
        output = response.get("output")
        if self.show or not isinstance(output, list):
            return text
        shown = [item for item in output if not self._is_server_call(item)]
        if len(shown) == len(output):
            return text
        return json.dumps(
            {**event, "response": {**response, "output": shown}}, separators=(",", ":")
        )

    def _forget(self, response_id: str) -> None:
        for call_id in self._awaiting.pop(response_id, ()):
            self._response_of.pop(call_id, None)

    def _is_server_call(self, item: Any) -> bool:
        if not isinstance(item, dict) or item.get("type") != "function_call":
            return False
        name = item.get("name")
        return isinstance(name, str) and name in self.server_tools

    # -- outputs

    def answered(self, call_id: str, active: set[str]) -> None:
        """A server call's output went upstream; `active` are the responses in flight."""
        response_id = self._response_of.pop(call_id, None)
        if response_id is None:
            return
        waiting = self._awaiting.get(response_id)
        if waiting is None:
            return
        waiting.discard(call_id)
        if not waiting and response_id not in active:
            del self._awaiting[response_id]
            self.follow_up_due = True

    def client_outputs(self, items: list[Any]) -> list[str] | str:
        """The call ids of the `function_call_output` items among `items`, if each answers an
        open client call (once); else the first call id that does not."""
        call_ids: list[str] = []
        for item in items:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                call_id = item.get("call_id")
                if (
                    not isinstance(call_id, str)
                    or call_id not in self._client_calls
                    or call_id in call_ids
                ):
                    return str(call_id)[:64]
                call_ids.append(call_id)
        return call_ids

    def close_client_calls(self, call_ids: list[str]) -> None:
        for call_id in call_ids:
            self._client_calls.pop(call_id, None)
