"""Where everything lives in Redis: one place for every key name the host uses.

Two layouts, chosen once the host knows what it talks to (``open_redis`` tells a Redis
Cluster from one server):

- **One Redis** (the embedded one, or ``redis.url``): ``{ns}:{P}:state:{key}``,
  ``{ns}:{P}:inbox``, ``{ns}:lease:{P}``, one ``{ns}:deadletter`` stream — the names
  CONTRACT §3 and every earlier release use.
- **Redis Cluster**: a process's name is its keys' hash tag, ``{ns}:{{P}}:state:{key}``,
  ``{ns}:{{P}}:inbox``, ``{ns}:lease:{{P}}``, …, so everything one message's commit
  touches — state, inbox, lease, fence, outbox, dead letters — is in one slot and the
  fenced script may touch it all (a cluster refuses a script whose keys span slots).
  Dead letters are per process for the same reason, and messages routed to another
  process go through the sender's outbox (``outbox``, ``relayed``: see _outbox). The hosts'
  records share the tag ``{hosts}``, so a heartbeat stays one script.

Process names cannot hold ``{``, ``}`` or ``:`` (config and discovery refuse them), so a
tag is exactly the process's name.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = ["Keys"]


@attrs.frozen
class Keys:
    ns: str = "reflow"
    clustered: bool = False

    def _p(self, process: str) -> str:
        return f"{{{process}}}" if self.clustered else process

    # -- a process's own keys (one slot per process in a cluster) ------------------------
    def state_prefix(self, process: str) -> str:
        return f"{self.ns}:{self._p(process)}:state:"

    def inbox(self, process: str) -> str:
        return f"{self.ns}:{self._p(process)}:inbox"

    def fanin(self, process: str, port: str) -> str:
        """One ``await_all_inports`` port's buffered values (see _fanin)."""
        return f"{self.ns}:{self._p(process)}:fanin:{port}"

    def deadletters(self, process: str) -> str:
        """Where ``process``'s dead letters go: one stream for all on one Redis, the
        process's own in a cluster (its commit writes it)."""
        return f"{self.ns}:{{{process}}}:deadletter" if self.clustered else f"{self.ns}:deadletter"

    def outbox(self, process: str) -> str:
        """Cluster only: what ``process``'s commits route to other processes (see _outbox)."""
        return f"{self.ns}:{{{process}}}:outbox"

    def relayed(self, process: str) -> str:
        """Cluster only: per sender, the last outbox entry delivered to ``process``'s inbox."""
        return f"{self.ns}:{{{process}}}:relayed"

    def lease(self, process: str) -> str:
        return f"{self.ns}:lease:{self._p(process)}"

    def fence(self, process: str) -> str:
        return f"{self.ns}:fence:{self._p(process)}"

    # -- the cluster's own ---------------------------------------------------------------
    def host(self, host_id: str) -> str:
        """A live host's record, kept with ``PX lease_ttl`` by its heartbeat."""
        return f"{self.ns}:{{hosts}}:{host_id}" if self.clustered else f"{self.ns}:host:{host_id}"

    def hosts(self) -> str:
        """The set of host ids that have joined; a dead one is dropped once its record expired."""
        return f"{self.ns}:{{hosts}}" if self.clustered else f"{self.ns}:hosts"

    def channel(self) -> str:
        """The Pub/Sub channel hosts tell each other on: ``wake PROCESS`` (its inbox has new
        entries), ``resweep PROCESS`` (a host that had lost its lease read from its inbox) and
        ``placement`` (a lease was released, a host joined or left). Pub/Sub is cluster-wide."""
        return f"{self.ns}:cluster"

    def deadletter_streams(self, processes: Iterable[str]) -> list[str]:
        """Every stream ``processes``' dead letters may be in (one on one Redis)."""
        return sorted({self.deadletters(p) for p in processes}) if self.clustered else [self.deadletters("")]

    def deadletter_id(self, process: str, stream_id: str) -> str:
        """A dead letter's public id (``deadletters.list``/``replay``): the stream id on one
        Redis, ``PROCESS:STREAM_ID`` in a cluster (the stream is the process's)."""
        return f"{process}:{stream_id}" if self.clustered else stream_id

    def deadletter_ref(self, entry_id: str) -> tuple[str | None, str]:
        """``deadletter_id`` read back: (process, stream id); the process is None on one
        Redis (the entry names it) and "" for a cluster id that names none."""
        if not self.clustered:
            return None, entry_id
        process, _, sid = entry_id.rpartition(":")
        return process, sid
