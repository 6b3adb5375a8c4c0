"""The agent fleet: agents, their credentials, heartbeats and eligibility for work."""

from stavily.fleet.agents import (
    AgentIdentity,
    authenticate_agent,
    create_agent,
    eligible,
    get_agent,
    list_agents,
)
from stavily.fleet.liveness import HeartbeatBuffer, Liveness

__all__ = [
    "AgentIdentity",
    "HeartbeatBuffer",
    "Liveness",
    "authenticate_agent",
    "create_agent",
    "eligible",
    "get_agent",
    "list_agents",
]
