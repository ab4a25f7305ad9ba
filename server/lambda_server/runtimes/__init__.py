"""Runtimes: worker processes that run scripts, and the pool that keeps them warm."""
