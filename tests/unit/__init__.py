"""Unit tests: pure code (router, policies, cache index, simulator, workloads, manifests), no sockets, no servers."""
