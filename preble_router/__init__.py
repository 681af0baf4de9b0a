"""preble-router: a prefix-aware router (Preble's E2 scheduling) in front of vLLM replicas."""

__version__ = "0.1.0"
