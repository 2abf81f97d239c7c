"""Agentainer Operator: workflows of agent containers on Docker or Kubernetes."""

__version__ = "0.1.0"
