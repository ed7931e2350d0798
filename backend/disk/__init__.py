"""Disk plumbing: folders written whole or not at all, and the size-capped caches."""
