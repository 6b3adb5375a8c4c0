"""The agent fleet: agents, their credentials, heartbeats and eligibility for work."""

from stavily.fleet.agents import (
    AgentIdentity,
    HeartbeatBuffer,
    authenticate_agent,
    create_agent,
    eligible,
    get_agent,
    list_agents,
)

__all__ = [
    "AgentIdentity",
    "HeartbeatBuffer",
    "authenticate_agent",
    "create_agent",
    "eligible",
    "get_agent",
    "list_agents",
]
