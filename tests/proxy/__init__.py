"""Proxy-level tests: the router, its upstream client and its feeds over real sockets, in front of fakes (testkit)."""
