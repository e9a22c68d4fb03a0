"""Node API values <-> the agent's protobuf messages (proto/agent.proto), in one place.

The messages mirror the dataclasses of control/node_api.py field for field, and each
call's request and reply follow one naming rule (see proto/agent.proto), so conversion is
generic: the NodeApi Protocol's type hints say what each call takes and returns, and
the message of each dataclass has its name. The agent's server and client call only
`rpc_name`, `encode_call`/`decode_call` (the request) and `encode_result`/`decode_result`
(the reply).

Adding a node API method: add it to NodeApi (node_api.py), add the RPC and its
<Rpc>Request/<Rpc>Reply messages (and a message for any new dataclass) to
proto/agent.proto, `make proto`, then one line in control/agent_server.py and one in
control/agent_client.py. tests/unit/test_agent_codec.py checks that every method has
its RPC and every dataclass its exact mirror.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Union

from control import node_api
from proto import agent_pb2


def rpc_name(method: str) -> str:
    """The RPC of a NodeApi method: create_volume -> CreateVolume."""
    return "".join(part.capitalize() for part in method.split("_"))


@functools.cache
def signature(method: str) -> dict[str, Any]:
    """Parameter name -> type (and "return"), from the NodeApi Protocol itself."""
    return typing.get_type_hints(getattr(node_api.NodeApi, method))


def message_class(name: str) -> Any:
    return getattr(agent_pb2, name)


# --- requests -----------------------------------------------------------------------------
def encode_call(method: str, args: dict[str, Any]) -> Any:
    """The <Rpc>Request of a call with these arguments."""
    request = message_class(rpc_name(method) + "Request")()
    hints = signature(method)
    for name, value in args.items():
        _set(request, name, value, hints[name])
    return request


def decode_call(method: str, request: Any) -> dict[str, Any]:
    """The arguments a request carries, as the NodeApi method takes them."""
    hints = signature(method)
    return {name: _get(request, name, hint) for name, hint in hints.items() if name != "return"}


# --- replies ------------------------------------------------------------------------------
def encode_result(method: str, value: Any) -> Any:
    reply = message_class(rpc_name(method) + "Reply")()
    hint = signature(method)["return"]
    if value is not None and hint is not type(None):
        _set(reply, "result", value, hint)
    return reply


def decode_result(method: str, reply: Any) -> Any:
    hint = signature(method)["return"]
    if hint is type(None):
        return None
    return _get(reply, "result", hint)


# --- values -------------------------------------------------------------------------------
def to_message(value: Any) -> Any:
    """A node API dataclass as its message (same name, same fields)."""
    message = message_class(type(value).__name__)()
    hints = typing.get_type_hints(type(value))
    for f in dataclasses.fields(value):
        _set(message, f.name, getattr(value, f.name), hints[f.name])
    return message


def from_message(message: Any, cls: Any) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _get(message, f.name, hints[f.name]) for f in dataclasses.fields(cls)})


def _optional(hint: Any) -> Any:
    """X for `X | None`, else None."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _set(message: Any, name: str, value: Any, hint: Any) -> None:
    inner = _optional(hint)
    if inner is not None:
        if value is not None:
            _set(message, name, value, inner)
        return
    if dataclasses.is_dataclass(hint):
        getattr(message, name).CopyFrom(to_message(value))
    elif typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        field = getattr(message, name)
        if dataclasses.is_dataclass(item):
            for v in value:
                field.add().CopyFrom(to_message(v))
        else:
            field.extend(value)
    elif typing.get_origin(hint) is dict:
        getattr(message, name).update(value)
    else:
        setattr(message, name, value)


def _get(message: Any, name: str, hint: Any) -> Any:
    inner = _optional(hint)
    if inner is not None:
        return _get(message, name, inner) if message.HasField(name) else None
    if dataclasses.is_dataclass(hint):
        return from_message(getattr(message, name), hint)
    if typing.get_origin(hint) is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        values = getattr(message, name)
        if dataclasses.is_dataclass(item):
            return tuple(from_message(v, item) for v in values)
        return tuple(item(v) for v in values)
    if typing.get_origin(hint) is dict:
        return dict(getattr(message, name))
    return hint(getattr(message, name))
