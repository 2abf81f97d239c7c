"""The kopf handlers of the controller: ``kopf run -m controller.handlers`` (or
``agentainer controller``) registers them all."""

from controller.handlers import agentpool, lifecycle, workflow

__all__ = ["agentpool", "lifecycle", "workflow"]
