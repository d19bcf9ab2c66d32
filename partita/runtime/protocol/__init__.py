"""The control protocol: one frozen dataclass per command a coordinator sends a worker, and per reply.

A command travels as a wire message (`partita.runtime.wire`): its `KIND` is the message kind, its
fields are the header, and the tensors it carries (a stage archive, profiling inputs, FL weights)
are the message's tensors. `command_from(message)` turns a decoded message into its command,
checking every field; a bad field raises `WorkerError` naming the command and the field, which the
worker answers with an `error` reply. `reply_from(message)` does the same for replies on the
coordinator's side. Nothing else reads a control header.

| command      | reply      | what it does |
|---|---|---|
| `Hello`      | `Info`     | what the worker is: device, memory, data address, speed, dilation |
| `Ping`       | `Pong`     | heartbeat (answered while long commands run) |
| `Load`       | `Ok`       | install a stage archive (sha256-checked, memory-checked), or the cached one of that sha256 |
| `Stash`      | `Ok`       | keep an archive in the cache without loading it (standby) |
| `Unload`     | `Ok`       | drop the given stages (None: all) |
| `Renumber`   | `Ok`       | serve loaded stages under new indices |
| `Allow`      | `Ok`       | the peers (z85 keys) that may send activations |
| `Route`      | `Ok`       | one epoch's data-plane wiring: where each stage's outputs go |
| `Profile`    | `Profiled` | time a chain of stage candidates |
| `Probe`      | `Probed`   | RTT, latency and bandwidth to a peer's data socket |
| `Emulate`    | `Ok`       | change the emulated speed, dilation or links |
| `Stats`      | `Figures`  | running figures per stage and link, counters |
| `Drain`      | `Ok`       | finish the requests in flight, then exit |
| `FlTrain`    | `FlUpdate` | one round of federated training (a worker job, see `partita.fl.serve`) |

Every command may carry `id` (an integer the reply echoes, see `ControlClient`); it is not a field
of the command. `Error` (`reason`, `type`) answers any command that failed.

The messages live in three modules: `base` (the base classes and field checks), `commands` and
`replies`; this package gathers them into the two registries.
"""

from __future__ import annotations

from typing import cast

from partita.errors import WorkerError
from partita.runtime.protocol.base import FL_TRAIN, FL_UPDATE, Command, Reply
from partita.runtime.protocol.commands import (
    Allow,
    Benchmark,
    Destination,
    Drain,
    Emulate,
    FlTrain,
    Hello,
    LinkChange,
    Load,
    Ping,
    Probe,
    Profile,
    Renumber,
    Route,
    StageRoute,
    Stash,
    Stats,
    Unload,
)
from partita.runtime.protocol.replies import (
    Benchmarked,
    Error,
    Figures,
    FlUpdate,
    Info,
    Ok,
    Pong,
    Probed,
    Profiled,
)
from partita.runtime.wire import Message

__all__ = [
    "COMMANDS", "COMMAND_KINDS", "REPLIES", "REPLY_KINDS", "FL_TRAIN", "FL_UPDATE",
    "Command", "Reply", "command_from", "reply_from",
    "Hello", "Ping", "Load", "Stash", "Unload", "Renumber", "Allow", "Destination", "StageRoute", "Route",
    "Profile", "Probe", "LinkChange", "Emulate", "Stats", "Drain", "FlTrain", "Benchmark",
    "Info", "Pong", "Ok", "Error", "Profiled", "Probed", "Figures", "FlUpdate", "Benchmarked",
]

COMMANDS: dict[str, type[Command]] = {
    c.KIND: c for c in (Hello, Ping, Load, Stash, Unload, Renumber, Allow, Route, Profile, Probe, Emulate, Stats, Drain,
                        FlTrain, Benchmark)
}
REPLIES: dict[str, type[Reply]] = {
    r.KIND: r for r in (Info, Pong, Ok, Error, Profiled, Probed, Figures, FlUpdate, Benchmarked)
}
COMMAND_KINDS = frozenset(COMMANDS)
REPLY_KINDS = frozenset(REPLIES)


def command_from(message: Message) -> Command:
    """The command `message` carries, every field checked; WorkerError if it is not a well-formed command."""
    kind = COMMANDS.get(message.kind)
    if kind is None:
        raise WorkerError(f"unknown command {message.kind!r}; commands: {', '.join(sorted(COMMANDS))}")
    return kind.parse(message.header, message.tensors)


def reply_from(message: Message) -> Reply:
    """The reply `message` carries, its fields checked; WorkerError if it is not a well-formed reply."""
    kind = REPLIES.get(message.kind)
    if kind is None:
        raise WorkerError(f"unknown reply {message.kind!r}; replies: {', '.join(sorted(REPLIES))}")
    return cast(Reply, kind.parse(message.header, message.tensors))
