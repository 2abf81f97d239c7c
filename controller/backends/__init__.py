"""Backends launch agents: Docker containers on a node, or Kubernetes pods."""
