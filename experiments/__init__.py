"""Runnable entry points, tasks and models."""
