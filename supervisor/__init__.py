"""reflow-supervisor: sandboxed, supervised script actors on trio.

The public names; everything else lives in private modules.
"""

from ._config import Config as Config, ConfigError as ConfigError, load_config as load_config
from ._discovery import ComponentSpec as ComponentSpec, discover as discover
from ._errors import (ActorError as ActorError, ActorFailed as ActorFailed, ActorTimedOut as ActorTimedOut,
                      Overloaded as Overloaded, ResourceLimitExceeded as ResourceLimitExceeded,
                      UnknownActor as UnknownActor)
from ._host import Host as Host
from ._policy import RestartType as RestartType, Strategy as Strategy

__all__ = ["ActorError", "ActorFailed", "ActorTimedOut", "ComponentSpec", "Config", "ConfigError", "Host",
           "Overloaded", "ResourceLimitExceeded", "RestartType", "Strategy", "UnknownActor", "discover",
           "load_config"]
