"""Several hosts on one Redis, the pure part: leases, fencing tokens, placement (CONTRACT §6).

Each process is owned by one host at a time, the holder of its lease: the key
``{ns}:lease:{process}`` whose value is the holder's *token*, ``"FENCE HOST_ID"``, set with
``PX lease_ttl``. The fence comes from ``INCR {ns}:fence:{process}``, so every new holder's
token differs from every earlier one. A holder renews its leases by compare-and-set
(``RENEW``); it never extends a lease it no longer holds.

Why the token is checked at the resource (Kleppmann, "How to do distributed locking"): a
host paused past its lease (GC, SIGSTOP, a partition) wakes up believing it still owns its
processes. So every write a process's owner makes — its state, the acknowledgement of its
message, the messages it routes — runs inside ``FENCED``, which first compares the
lease's value with the writer's token, in the same script: Redis runs scripts one at a
time, so no other owner's write can come between the check and the writes. A stale token
writes nothing and is answered ``FENCED``. (A feeder's read checks the lease in the same
MULTI/EXEC instead: see ActorCell.read_inbox.)

Placement is rendezvous (highest-random-weight) hashing over the live hosts that have a
process's labels: every host computes the same owner from the same host set without
talking to the others, and a host joining or leaving moves only its own share. The lease,
not the hash, is the truth: a host acquires a lease only when it is free.

Nothing here does I/O: these are key names, Lua sources, command builders and the
placement function; ``_cluster`` runs them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import orjson

from .keys import Keys

__all__ = ["CLUSTER_VERSION", "HostRecord", "Token", "lease_key", "fence_key", "host_key", "hosts_key",
           "channel", "rendezvous", "eligible", "place", "fenced_cmd", "acquire_cmd", "renew_cmd",
           "release_cmd", "renew_lost", "decode_host", "FENCED", "ACQUIRE", "RENEW", "RENEW_LEASE", "RELEASE"]

#: Hosts of different cluster versions do not share a Redis (a host refuses to join).
CLUSTER_VERSION = 1


def lease_key(ns: str, process: str) -> str:
    return Keys(ns).lease(process)


def fence_key(ns: str, process: str) -> str:
    return Keys(ns).fence(process)


def host_key(ns: str, host_id: str) -> str:
    return Keys(ns).host(host_id)


def hosts_key(ns: str) -> str:
    return Keys(ns).hosts()


def channel(ns: str) -> str:
    return Keys(ns).channel()


@attrs.frozen
class Token:
    """A lease holder's fencing token: the fence and the host, as stored in the lease key."""

    fence: int
    host: str

    @property
    def value(self) -> str:
        return f"{self.fence} {self.host}"

    @classmethod
    def parse(cls, raw: Any) -> Token | None:
        """A lease key's value, or None for anything else (a hostile or foreign reply included)."""
        if isinstance(raw, bytes):
            try:
                raw = raw.decode()
            except UnicodeDecodeError:
                return None
        if not isinstance(raw, str):
            return None
        fence, _, host = raw.partition(" ")
        if not fence.isdigit() or not host:
            return None
        return cls(int(fence), host)


@attrs.frozen
class HostRecord:
    """What a host tells the others about itself (``host_key``)."""

    id: str
    url: str
    labels: tuple[str, ...] = ()
    version: int = CLUSTER_VERSION
    pid: int = 0
    started: float = 0.0
    last_seen: float = 0.0
    # The processes its config has (so placement gives it none it cannot run, as during a
    # rolling deploy that adds one); None: a record that does not say (it may run any).
    runs: tuple[str, ...] | None = None

    def encode(self) -> bytes:
        return orjson.dumps(attrs.asdict(self))


def decode_host(raw: Any) -> HostRecord | None:
    """A host record read back from Redis; None if it is not one (never trusted blindly)."""
    try:
        d = orjson.loads(raw)
        rec = HostRecord(id=str(d["id"]), url=str(d["url"]), labels=tuple(str(x) for x in d.get("labels", ())),
                         version=int(d.get("version", 0)), pid=int(d.get("pid", 0)),
                         started=float(d.get("started", 0.0)), last_seen=float(d.get("last_seen", 0.0)),
                         runs=None if d.get("runs") is None else tuple(str(x) for x in d["runs"]))
    except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
        return None
    if rec.url and not rec.url.startswith(("ws://", "wss://")):
        return None  # (a forwarder sends the cluster's token there: a WebSocket API or nothing)
    return rec


def _weight(process: str, host: str) -> bytes:
    return hashlib.blake2b(f"{process}\0{host}".encode(), digest_size=8).digest()


def rendezvous(process: str, hosts: Iterable[str]) -> str | None:
    """The host that should own ``process`` among ``hosts`` (None if there is none)."""
    best = None
    best_w = b""
    for h in hosts:
        w = _weight(process, h)
        if best is None or w > best_w or (w == best_w and h > best):
            best, best_w = h, w
    return best


def eligible(hosts: Mapping[str, HostRecord], labels: Sequence[str], process: str | None = None) -> list[str]:
    """The hosts that may own ``process``, placed on ``labels``: those with all of them, whose
    config has the process."""
    need = set(labels)
    return [h for h, rec in hosts.items()
            if need <= set(rec.labels) and (process is None or rec.runs is None or process in rec.runs)]


def place(process: str, hosts: Mapping[str, HostRecord], labels: Sequence[str]) -> str | None:
    return rendezvous(process, eligible(hosts, labels, process))


# -- Lua ------------------------------------------------------------------------------------------
# Scripts are sent with EVAL (Redis caches them by digest); they name the keys they touch in
# KEYS where they can.

# KEYS[1] the lease; ARGV[1] the writer's token; then commands, each as its argument count
# followed by its arguments. Runs them only while the lease holds that token; returns the
# last command's reply (a feeder's XREADGROUP, say), or the FENCED error.
FENCED = """
local held = redis.call('GET', KEYS[1])
if held ~= ARGV[1] then
  return redis.error_reply('FENCED ' .. KEYS[1] .. ' is held by ' .. (held or 'no one') .. ', not ' .. ARGV[1])
end
local i, n, r = 2, #ARGV, 1
while i <= n do
  local argc = tonumber(ARGV[i])
  r = redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
return r
"""

# KEYS[1] the lease, KEYS[2] the fence counter; ARGV[1] the host, ARGV[2] the TTL in ms.
# Free: takes it with the next fence and returns {fence, released}, where released is 1 when
# the last holder let it go by RELEASE (a handoff: its entries pending in the inbox were only
# read ahead), 0 when it expired (its host died holding them). Held: returns its value.
ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held then return held end
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], fence .. ' ' .. ARGV[1], 'PX', ARGV[2])
local released = redis.call('GET', KEYS[2] .. ':released')
return {fence, (released and tonumber(released) == last) and 1 or 0}
"""

# KEYS[1] this host's record, KEYS[2] the host set, then the leases it believes it holds;
# ARGV[1] the record, ARGV[2] the TTL in ms, ARGV[3] the host id, then each lease's token.
# Renews the record and every lease still held with its token; returns the indexes (from 1)
# of the leases it no longer holds.
RENEW = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
local lost = {}
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    lost[#lost + 1] = i - 2
  end
end
return lost
"""

# KEYS[1] a lease; ARGV[1] its holder's token, ARGV[2] the TTL in ms. RENEW for one lease: in a
# Redis Cluster each lease is in its process's slot, so a host renews them one by one.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1] the lease, KEYS[2] the fence counter; ARGV[1] the token, ARGV[2] its fence,
# ARGV[3] the channel. Lets the lease go if it still holds this token, recording that it was
# handed over (see ACQUIRE), and tells the other hosts.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2] .. ':released', ARGV[2])
redis.call('PUBLISH', ARGV[3], 'placement')
return 1
"""


def fenced_cmd(lease: str, token: str, cmds: Sequence[Sequence[Any]]) -> tuple:
    """One EVAL that runs ``cmds`` only while ``lease`` holds ``token`` (see FENCED)."""
    args: list[Any] = ["EVAL", FENCED, 1, lease, token]
    for c in cmds:
        args.append(len(c))
        args.extend(c)
    return tuple(args)


def acquire_cmd(keys: Keys, process: str, host: str, ttl_ms: int) -> tuple:
    return ("EVAL", ACQUIRE, 2, keys.lease(process), keys.fence(process), host, ttl_ms)


def renew_cmd(keys: Keys, record: HostRecord, ttl_ms: int, held: Sequence[tuple[str, str]]) -> list[tuple]:
    """The commands that renew ``record`` and each lease of ``held`` ((process, token value)
    for each lease the host believes it holds): one script on one Redis; in a cluster, the
    record and then one RENEW_LEASE per lease (each in its own slot). See ``renew_lost``."""
    if not keys.clustered:
        return [("EVAL", RENEW, 2 + len(held), keys.host(record.id), keys.hosts(),
                 *(keys.lease(p) for p, _ in held), record.encode(), ttl_ms, record.id, *(t for _, t in held))]
    return [("EVAL", RENEW, 2, keys.host(record.id), keys.hosts(), record.encode(), ttl_ms, record.id),
            *(("EVAL", RENEW_LEASE, 1, keys.lease(p), t, ttl_ms) for p, t in held)]


def renew_lost(replies: Sequence[Any], n_held: int) -> list[int]:
    """Which leases (indexes into ``held``, from 0) ``renew_cmd``'s replies say are no longer
    held. Raises the first error reply (an Exception instance) it finds."""
    for r in replies:
        if isinstance(r, Exception):
            raise r
    if len(replies) == 1:  # (one script: RENEW's list of lost indexes, from 1)
        lost = replies[0]
        return [i - 1 for i in lost if isinstance(i, int) and 1 <= i <= n_held] if isinstance(lost, list) else []
    return [i for i, r in enumerate(replies[1:1 + n_held]) if r != 1]


def release_cmd(keys: Keys, process: str, token: Token) -> tuple:
    return ("EVAL", RELEASE, 2, keys.lease(process), keys.fence(process), token.value, token.fence,
            keys.channel())
