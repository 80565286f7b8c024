"""reflow-supervisor: sandboxed, supervised script actors on trio.

The public names; everything else lives in private modules (and ``supervisor.client``,
the client's own module, whose names are these same objects). tests/test_exports.py
checks that each public name is exported here exactly once.
"""

# The client: a trio WebSocket client for the host's API, and what its calls raise.
from .client import Client as Client, open_client as open_client
from .core.jsonrpc import RpcError as RpcError
from ._peer import ConnectionLost as ConnectionLost

# The errors the host answers with (each carries its JSON-RPC ``code``).
from .core.errors import (ActorError as ActorError, ActorFailed as ActorFailed, ActorMoved as ActorMoved,
                          ActorRemoved as ActorRemoved, ActorStopped as ActorStopped, ActorTimedOut as ActorTimedOut,
                          InvalidParams as InvalidParams, Overloaded as Overloaded, RemoteError as RemoteError,
                          RequestCancelled as RequestCancelled, ResourceLimitExceeded as ResourceLimitExceeded,
                          Unauthorized as Unauthorized, UnknownActor as UnknownActor)
from .core.errors import HostError as HostError  # the host cannot start as configured

# Configuration: reflow.yaml loaded into frozen attrs; bad input is one ConfigError naming each key.
from .core.config import (Config as Config, ConfigError as ConfigError, ConfigProblem as ConfigProblem,
                          load_config as load_config)
from .core.policy import RestartType as RestartType, Strategy as Strategy

# Discovery: script actors' metadata, read and never run.
from .core.discovery import (ComponentSpec as ComponentSpec, ScriptError as ScriptError,
                             ScriptProblem as ScriptProblem)
from ._scan import discover as discover

# The host itself (``python -m supervisor run``).
from ._host import Host as Host

__all__ = [
    "ActorError", "ActorFailed", "ActorMoved", "ActorRemoved", "ActorStopped", "ActorTimedOut", "Client", "ComponentSpec", "Config",
    "ConfigError", "ConfigProblem", "ConnectionLost", "Host", "HostError", "InvalidParams", "Overloaded",
    "RemoteError", "RequestCancelled", "ResourceLimitExceeded", "RestartType", "RpcError", "ScriptError", "ScriptProblem",
    "Strategy", "Unauthorized", "UnknownActor", "discover", "load_config", "open_client",
]
