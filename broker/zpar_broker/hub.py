"""The embedded cluster's one process: a broker and an agent in one loop (started by ``zpar_broker.embedded``).

``zpar.Client()`` with no address starts it as a child process
(``python -m zpar_broker.embedded``). It is the same BrokerCore and the same
AgentServer as the two daemons, but the agent reaches the broker by a method
call instead of two sockets: one ZeroMQ hop fewer each way, so a round trip is
a third shorter. Its only endpoint is the producers' frontend, an ipc socket
in the client's private directory.
"""

from __future__ import annotations

import zmq

from zpar import protocol as P
from zpar._loop import Waker, run_loop
from zpar.agent.server import AgentServer
from zpar.agent.spawn import Prestarted
from zpar.config import AgentConfig, BrokerConfig

from .server import BrokerServer


class _LocalUplink:
    """The agent's side of the in-process link."""

    def __init__(self, broker: BrokerServer, identity: bytes) -> None:
        self.broker, self.identity = broker, identity

    def send(self, msg: P.Message) -> None:
        self.broker.from_local_agent(self.identity, msg)

    def send_results(self, msg: P.Result | P.Items) -> bool:
        self.broker.from_local_agent(self.identity, msg)
        return True

    def welcomed(self, msg: P.Welcome) -> None:
        pass

    def auth_failure(self) -> None:  # no handshake in-process
        return None

    def socket(self) -> None:
        return None

    def close(self) -> None:
        pass


class EmbeddedNode:
    """A broker and its one agent, sharing a context, a poller and a wake-up."""

    def __init__(self, broker_config: BrokerConfig, agent_config: AgentConfig,
                 prestarted: Prestarted | None = None) -> None:
        self.ctx = zmq.Context()
        self.poller = zmq.Poller()
        self.waker = Waker()
        self.broker = BrokerServer(broker_config, self.ctx, poller=self.poller, waker=self.waker, defer_dashboard=True)
        self.broker.core.shared_values = True  # its workers' results may be in this host's shared memory
        uplink = _LocalUplink(self.broker, b"")
        self.agent = AgentServer(agent_config, uplink=uplink, ctx=self.ctx, poller=self.poller, waker=self.waker,
                                 prestarted=prestarted)
        uplink.identity = self.agent.identity
        self.broker.local_agents[self.agent.identity] = self.agent.from_broker

    def stop(self) -> None:
        self.waker.wake()

    def run(self) -> None:
        # The agent stops first: it hands its tasks back while the broker still listens.
        run_loop([self.agent, self.broker], self.poller, self.waker)

    def close(self) -> None:
        self.agent.close()
        self.broker.close()
        self.waker.close()
        self.ctx.term()
