"""Preble's per-replica pieces as vLLM plugins (no vLLM fork): see README.md in this directory.

- ``vllm_patches.scheduler.PrebleScheduler`` / ``PrebleAsyncScheduler``: ``--scheduler-cls``; the waiting
  queue becomes Preble's cache-hit priority groups with an age bound (``vllm_patches.group_queue``).
- ``vllm_patches.plugin``: ``register`` (``vllm.general_plugins``) and ``endpoint_plugin``
  (``vllm.endpoint_plugins``): ``GET /preble/load`` and ``preble:*`` gauges on ``/metrics``.

Importing this package does not import vLLM.
"""

# vLLM versions these plugins were tested with (the scheduler subclasses private vLLM classes).
TESTED_VLLM_VERSIONS = ("0.32.0",)
