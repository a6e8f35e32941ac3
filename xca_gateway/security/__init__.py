"""Who may see what: the caller model and door guard, XUA, access policy, consent."""

from xca_gateway.security.callers import (
    ACCESS,
    AccessDecision,
    CallerDirectory,
    CallerRule,
    Door,
    Identity,
    Principal,
    Role,
    current_caller,
)
from xca_gateway.security.config import CallerConfigError, parse_caller_rule
from xca_gateway.security.guard import DoorGuard, access_denied_message, identity_from_peer

__all__ = [
    "ACCESS",
    "AccessDecision",
    "CallerConfigError",
    "CallerDirectory",
    "CallerRule",
    "Door",
    "DoorGuard",
    "Identity",
    "Principal",
    "Role",
    "access_denied_message",
    "current_caller",
    "identity_from_peer",
    "parse_caller_rule",
]
