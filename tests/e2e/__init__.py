"""End-to-end tests: real vLLM CPU replicas as processes (marked e2e; slow)."""
